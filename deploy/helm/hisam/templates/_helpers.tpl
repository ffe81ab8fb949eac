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

{{/* Environment every hisam container gets: where Kafka is, a writable HOME, the pod IP (what
     /metrics binds to). */}}
{{- define "hisam.env" -}}
- name: HISAM_KAFKA_BOOTSTRAP
  value: {{ .Values.kafka.bootstrap | quote }}
- name: HISAM_ONLINE_BACKEND
  value: redis
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- if .Values.metrics.enabled }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
{{- end -}}

{{/* HISAM_REDIS_URL, the default of --redis-url (hisam/jobs/stream_worker.py add_store_arguments),
     for the components that use Redis (stream workers, Rank servers; not the trainer). With
     redis.existingSecret, a reference to the Secret's key: the URL and its password never
     appear in the manifest (and never in args, which `ps` and `kubectl describe` show). */}}
{{- define "hisam.redisEnv" -}}
- name: HISAM_REDIS_URL
{{- if .Values.redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- else }}
  value: {{ .Values.redis.url | quote }}
{{- end }}
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
     then the container port. The address is the pod IP (POD_IP, from the downward API, which
     Kubernetes substitutes into $(POD_IP)): reachable by Prometheus, not on every interface
     (the CLI default, 127.0.0.1, is unreachable from the rest of the cluster). */}}
{{- define "hisam.metricsArgs" -}}
- --metrics-port={{ .Values.metrics.port }}
- --metrics-addr=$(POD_IP)
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

{{/* The Rank server's exec probe with TLS on: include with (dict "root" $ "service" "liveness").
     grpc.health.v1 Check of `service` over TLS to 127.0.0.1, the server certificate verified
     against /etc/hisam/tls/ca.crt under the name rankServer.tls.serverName; with mutual TLS the
     probe presents the server's own certificate. Exit 0 only when SERVING. */}}
{{- define "hisam.rankTlsProbe" -}}
{{- $c := .root.Values.rankServer -}}
exec:
  command:
    - python
    - -c
    - |
      import sys, grpc
      from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as rpc
      port, name, service, ca, *pair = sys.argv[1:]
      read = lambda path: open(path, "rb").read()
      key, cert = (read(pair[1]), read(pair[0])) if pair else (None, None)
      creds = grpc.ssl_channel_credentials(read(ca), key, cert)
      opts = [("grpc.ssl_target_name_override", name)]
      with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
          try:
              got = rpc.HealthStub(ch).Check(pb.HealthCheckRequest(service=service), timeout=3).status
          except grpc.RpcError as e:
              sys.exit(f"{e.code().name}: {e.details()}")
      sys.exit(0 if got == pb.HealthCheckResponse.SERVING else pb.HealthCheckResponse.ServingStatus.Name(got))
    - {{ $c.port | quote }}
    - {{ default (printf "%s-rank-server.%s.svc" (include "hisam.fullname" .root) .root.Release.Namespace) $c.tls.serverName | quote }}
    - {{ .service | quote }}
    - /etc/hisam/tls/ca.crt
    {{- if $c.tls.mutual }}
    - /etc/hisam/tls/tls.crt
    - /etc/hisam/tls/tls.key
    {{- end }}
{{- end -}}

{{/* NetworkPolicy pieces (templates/networkpolicy.yaml). An ingress rule for /metrics on `port`
     from networkPolicy.metricsScrapers (none when metrics are off or no scraper is listed). */}}
{{- define "hisam.np.metricsIngress" -}}
{{- if and .root.Values.metrics.enabled .root.Values.networkPolicy.metricsScrapers -}}
- from:
    {{- toYaml .root.Values.networkPolicy.metricsScrapers | nindent 4 }}
  ports:
    - port: {{ .port }}
      protocol: TCP
{{- end -}}
{{- end -}}

{{/* An egress rule to `ports` (TCP) of the peers `to` (any address when empty). */}}
{{- define "hisam.np.egress" -}}
- ports:
    {{- range .ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Egress to the release's Triton pods, gRPC port. */}}
{{- define "hisam.np.tritonEgress" -}}
- ports:
    - port: 8001
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          {{- include "hisam.selectorLabels" (dict "root" . "component" "triton") | nindent 10 }}
{{- end -}}

{{/* Egress to DNS: networkPolicy.egress.dns.ports, UDP and TCP. */}}
{{- define "hisam.np.dnsEgress" -}}
{{- $dns := .Values.networkPolicy.egress.dns -}}
- ports:
    {{- range $dns.ports }}
    - port: {{ . }}
      protocol: UDP
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The Triton hop, client side (the Rank servers and the trainer; infra/triton_access.py): the
     client key and the TLS files, mounted from Secrets and passed as paths. */}}
{{- define "hisam.tritonClientArgs" -}}
{{- $t := .Values.triton -}}
{{- if $t.access.existingSecret }}
- --triton-key-file=/etc/hisam/triton-key/client-key
{{- end }}
{{- if $t.tls.existingSecret }}
- --triton-tls-ca=/etc/hisam/triton-ca/ca.crt
{{- if $t.tls.mutual }}
- --triton-tls-cert=/etc/hisam/triton-client/tls.crt
- --triton-tls-key=/etc/hisam/triton-client/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{- define "hisam.tritonClientMounts" -}}
{{- $t := .Values.triton -}}
{{- if $t.access.existingSecret }}
# The directory, not a subPath: a changed Secret reaches the file, read again at every call.
- name: triton-key
  mountPath: /etc/hisam/triton-key
  readOnly: true
{{- end }}
{{- if $t.tls.existingSecret }}
- name: triton-ca
  mountPath: /etc/hisam/triton-ca
  readOnly: true
{{- if $t.tls.mutual }}
- name: triton-client
  mountPath: /etc/hisam/triton-client
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "hisam.tritonClientVolumes" -}}
{{- $t := .Values.triton -}}
{{- if $t.access.existingSecret }}
- name: triton-key
  secret:
    secretName: {{ $t.access.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $t.access.clientKey }}
        path: client-key
{{- end }}
{{- if $t.tls.existingSecret }}
- name: triton-ca
  secret:
    secretName: {{ $t.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
{{- if $t.tls.mutual }}
- name: triton-client
  secret:
    secretName: {{ $t.tls.clientSecret }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* Kafka security (docs/operations.md "Security: Kafka"): the protocol from kafka.tls.enabled
     and kafka.sasl.mechanism; the credentials and certificates of kafka.existingSecret mounted as
     files under /var/run/secrets/hisam/kafka, and only their paths in the args (infra/kafka_security.py
     reads the user and password from the files). For the stream workers and the trainer. */}}
{{- define "hisam.kafkaProtocol" -}}
{{- $k := .Values.kafka -}}
{{- if $k.sasl.mechanism -}}
{{- if $k.tls.enabled }}SASL_SSL{{ else }}SASL_PLAINTEXT{{ end -}}
{{- else if $k.tls.enabled }}SSL{{ else }}PLAINTEXT{{ end -}}
{{- end -}}

{{- define "hisam.kafkaSecretItems" -}}
{{- $k := .Values.kafka -}}
{{- if $k.sasl.mechanism }}
- key: {{ $k.secretKeys.username }}
  path: username
- key: {{ $k.secretKeys.password }}
  path: password
{{- end }}
{{- if and $k.tls.enabled $k.secretKeys.ca }}
- key: {{ $k.secretKeys.ca }}
  path: ca.crt
{{- end }}
{{- if and $k.tls.enabled $k.secretKeys.cert }}
- key: {{ $k.secretKeys.cert }}
  path: tls.crt
- key: {{ $k.secretKeys.key }}
  path: tls.key
{{- end }}
{{- end -}}

{{- define "hisam.kafkaArgs" -}}
{{- $k := .Values.kafka -}}
{{- $dir := "/var/run/secrets/hisam/kafka" -}}
{{- $p := include "hisam.kafkaProtocol" . -}}
{{- if ne $p "PLAINTEXT" }}
- --kafka-security-protocol={{ $p }}
{{- end }}
{{- if $k.sasl.mechanism }}
- --kafka-sasl-mechanism={{ $k.sasl.mechanism }}
- --kafka-username-file={{ $dir }}/username
- --kafka-password-file={{ $dir }}/password
{{- end }}
{{- if and $k.tls.enabled $k.secretKeys.ca }}
- --kafka-tls-ca={{ $dir }}/ca.crt
{{- end }}
{{- if and $k.tls.enabled $k.secretKeys.cert }}
- --kafka-tls-cert={{ $dir }}/tls.crt
- --kafka-tls-key={{ $dir }}/tls.key
{{- end }}
{{- end -}}

{{- define "hisam.kafkaMounts" -}}
{{- if trim (include "hisam.kafkaSecretItems" .) }}
- name: kafka-credentials
  mountPath: /var/run/secrets/hisam/kafka
  readOnly: true
{{- end }}
{{- end -}}

{{- define "hisam.kafkaVolumes" -}}
{{- $items := trim (include "hisam.kafkaSecretItems" .) -}}
{{- if $items }}
- name: kafka-credentials
  secret:
    secretName: {{ .Values.kafka.existingSecret }}
    defaultMode: 0440  # root:fsGroup, read by the pod's group only
    items:
      {{- $items | nindent 6 }}
{{- end }}
{{- end -}}
