{{/* Names, labels and the pieces every component shares. */}}

{{- define "hisam.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hisam.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "hisam.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "hisam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hisam
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "rank-server"). */}}
{{- define "hisam.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hisam.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hisam.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hisam.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "hisam.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "hisam.artifactsClaim" -}}
{{- default (printf "%s-artifacts" (include "hisam.fullname" .)) .Values.artifacts.existingClaim -}}
{{- end -}}

{{/* Environment every hisam container gets: where Kafka and Redis are, a writable HOME. */}}
{{- define "hisam.env" -}}
- name: HISAM_KAFKA_BOOTSTRAP
  value: {{ .Values.kafka.bootstrap | quote }}
- name: HISAM_REDIS_URL
  value: {{ .Values.redis.url | quote }}
- name: HISAM_ONLINE_BACKEND
  value: redis
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* Scheduling fields of a component's values. */}}
{{- define "hisam.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Resources, with the GPU limit added when the component asks for one. */}}
{{- define "hisam.resources" -}}
{{- $res := deepCopy .resources -}}
{{- if and .gpu .gpu.enabled -}}
{{- $limits := default dict $res.limits -}}
{{- $_ := set $limits .gpu.resourceName (.gpu.count | toString) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The near-line trainer's command line (hisam trainer run). */}}
{{- define "trainerArgs" -}}
- trainer
- run
- --bootstrap={{ .Values.kafka.bootstrap }}
- --group-id={{ .Values.trainer.groupId }}
- --state-dir=/state
- --template-dir=/state/onnx_templates
- --model-repo=/artifacts/{{ .Values.artifacts.modelRepoPath }}
- --checkpoint=/artifacts/{{ .Values.artifacts.checkpointPath }}
- --triton-url={{ include "hisam.fullname" . }}-triton:8001
- --target={{ .Values.trainer.publishTarget }}
- --device={{ if .Values.trainer.gpu.enabled }}cuda{{ else }}cpu{{ end }}
- --keep={{ .Values.trainer.keepVersions }}
- --margin={{ .Values.trainer.gate.margin }}
- --min-samples={{ .Values.trainer.gate.minSamples }}
{{- end -}}

{{/* /metrics of a hisam process (infra/observability.py), when metrics are on: the CLI options,
     then the container port. The address is 0.0.0.0: the CLI default, 127.0.0.1, is unreachable
     from the rest of the cluster. */}}
{{- define "hisam.metricsArgs" -}}
- --metrics-port={{ .Values.metrics.port }}
- --metrics-addr=0.0.0.0
{{- end -}}

{{- define "hisam.metricsContainerPort" -}}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end -}}

{{/* Prometheus scrape annotations of a pod: include with (dict "root" $ "port" 8002). Empty unless
     metrics and metrics.podAnnotations are both on. */}}
{{- define "hisam.metricsAnnotations" -}}
{{- if and .root.Values.metrics.enabled .root.Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end -}}
{{- end -}}
