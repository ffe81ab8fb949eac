"""The Helm chart (deploy/helm/hisam): renders for default and production-like values (and with
metrics off, and with a ServiceMonitor), passes strict lint, and every manifest validates against
the Kubernetes 1.30 schemas, all offline."""

from __future__ import annotations

from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "hisam"
PRODUCTION = ROOT / "deploy" / "helm" / "values-production.yaml"
KUBE = "1.30.0"
VALUES = {
    "default": None,
    "production": yaml.safe_load(PRODUCTION.read_text()),
    "metrics-off": {"metrics": {"enabled": False}},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}},
}
COMPONENTS = {"stream-worker", "trainer", "triton", "rank-server"}
HISAM_COMPONENTS = ("stream-worker", "trainer", "rank-server")  # run the hisam image (/metrics on metrics.port)
# Custom resources kubernetes-validate has no schema for (it knows only the built-in API).
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def render(values: dict | None) -> list[dict]:
    chart = helm_python.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="hisam", namespace="recsys", is_install=True)
    finally:
        chart.close()
    return [
        doc for path, text in sorted(out.items()) if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc
    ]


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def pod_annotations(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"].get("annotations", {})
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def services(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Service"}


@pytest.mark.parametrize("name", VALUES)
def test_strict_lint_passes(name: str) -> None:
    report = helm_python.lint(str(CHART), VALUES[name], strict=True, kube_version=f"v{KUBE}")
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


@pytest.mark.parametrize("name", VALUES)
def test_every_manifest_validates_against_kubernetes_schemas(name: str) -> None:
    docs = render(VALUES[name])
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for doc in docs:  # strict: unknown fields fail; an unknown kind raises instead of passing with a warning
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            # A CRD kind (the Prometheus Operator's ServiceMonitor) is unknown to kubernetes-validate,
            # which would raise; it is checked field by field in test_service_monitor_scrapes_every_component.
            continue
        kubernetes_validate.validate(doc, KUBE, strict=True)


def test_the_validator_rejects_an_unknown_field() -> None:
    """Guard against a validator that passes everything."""
    doc = next(d for d in render(None) if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE, strict=True)


@pytest.mark.parametrize("name", VALUES)
def test_pods_run_as_non_root_with_resources_and_probes(name: str) -> None:
    specs = pod_specs(render(VALUES[name]))
    assert set(specs) == COMPONENTS
    for component, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, component
        assert spec["automountServiceAccountToken"] is False, component
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], component
            assert sc["readOnlyRootFilesystem"] is True, component
            assert c["resources"]["requests"] and c["resources"]["limits"], component
    for served in ("triton", "rank-server"):
        c = specs[served]["containers"][0]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), served
    # grpc.health.v1: the kubelet's gRPC probe, or with TLS on (production) the same check over TLS from
    # inside the pod (tests/security/test_chart_security.py).
    assert ("exec" if name == "production" else "grpc") in specs["rank-server"]["containers"][0]["readinessProbe"]


def test_production_values_place_gpu_work_on_gpu_nodes() -> None:
    specs = pod_specs(render(VALUES["production"]))
    for component in ("trainer", "triton"):
        c = specs[component]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", component
        assert specs[component]["nodeSelector"] and specs[component]["tolerations"], component
    assert "--device=cuda" in specs["trainer"]["containers"][0]["args"]
    assert "--target=gpu" in specs["trainer"]["containers"][0]["args"]
    default = pod_specs(render(None))
    assert all("nvidia.com/gpu" not in s["containers"][0]["resources"]["limits"] for s in default.values())


def test_kafka_and_redis_endpoints_reach_every_component() -> None:
    values = {"kafka": {"bootstrap": "broker-a:9093,broker-b:9093"}, "redis": {"url": "rediss://cache:6380/2"}}
    specs = pod_specs(render(values))
    for component in ("stream-worker", "trainer", "rank-server"):
        env = {e["name"]: e.get("value") for e in specs[component]["containers"][0]["env"]}
        assert env["HISAM_KAFKA_BOOTSTRAP"] == "broker-a:9093,broker-b:9093", component
        # The trainer does not use Redis: it gets no Redis URL (nor, with a Secret, its password).
        assert env.get("HISAM_REDIS_URL") == (None if component == "trainer" else "rediss://cache:6380/2"), component
    assert "--bootstrap=broker-a:9093,broker-b:9093" in specs["stream-worker"]["containers"][0]["args"]


@pytest.mark.parametrize(
    "values, field",
    [
        ({"redis": {"url": "cache:6379"}}, "/redis/url"),
        ({"kafka": {"bootstrap": "no-port"}}, "/kafka/bootstrap"),
        ({"rankServer": {"replicas": 0}}, "/rankServer/replicas"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"trainer": {"publishTarget": "tpu"}}, "/trainer/publishTarget"),
        ({"triton": {"replica": 2}}, "replica"),
        ({"metrics": {"port": 80}}, "/metrics/port"),  # a non-root container without NET_BIND_SERVICE
        ({"metrics": {"enabled": "yes"}}, "/metrics/enabled"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
        ({"metrics": {"path": "/stats"}}, "path"),
    ],
)
def test_bad_values_are_refused_by_the_schema(values: dict, field: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=field):
        render(values)


def test_disabled_components_render_nothing() -> None:
    off = {c: {"enabled": False} for c in ("streamWorker", "trainer", "triton", "rankServer")}
    docs = render(off)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "PersistentVolumeClaim", "NetworkPolicy"}
    # networkPolicy.enabled (default true): only the release's default deny is left.
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"] == ["hisam-default-deny"]


@pytest.mark.parametrize("name", VALUES)
def test_container_args_parse_with_the_real_cli(name: str) -> None:
    """Every hisam container's args are accepted by the ``hisam`` parser (a renamed flag fails here, not in a pod)."""
    from hisam import cli

    specs = pod_specs(render(VALUES[name]))
    for component in ("stream-worker", "trainer", "rank-server"):
        argv = specs[component]["containers"][0]["args"]
        args = cli.build_parser(cli._match(argv)).parse_args(argv)
        assert args._module.startswith("hisam.jobs."), component


@pytest.mark.parametrize("name", ["default", "production", "service-monitor"])
def test_metrics_are_exposed_when_enabled(name: str) -> None:
    docs = render(VALUES[name])
    specs, annotations, svcs = pod_specs(docs), pod_annotations(docs), services(docs)
    for component in HISAM_COMPONENTS:
        c = specs[component]["containers"][0]
        assert c["args"][-2:] == ["--metrics-port=9100", "--metrics-addr=$(POD_IP)"], component  # the pod IP
        assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"], component
        assert annotations[component] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "9100",
            "prometheus.io/path": "/metrics",
        }, component
    triton = specs["triton"]["containers"][0]  # Triton serves its own metrics on 8002
    assert "--metrics-port=8002" in triton["args"] and "--allow-metrics=false" not in triton["args"]
    assert {"name": "metrics", "containerPort": 8002, "protocol": "TCP"} in triton["ports"]
    assert annotations["triton"]["prometheus.io/port"] == "8002"
    assert annotations["triton"]["prometheus.io/scrape"] == "true"
    # Every component's Service names the metrics port (what a ServiceMonitor scrapes).
    assert set(svcs) == COMPONENTS
    for component, port in {"stream-worker": 9100, "trainer": 9100, "rank-server": 9100, "triton": 8002}.items():
        ports = {p["name"]: p for p in svcs[component]["spec"]["ports"]}
        assert ports["metrics"]["port"] == port and ports["metrics"]["targetPort"] == "metrics", component
    assert svcs["stream-worker"]["spec"]["clusterIP"] == "None"  # headless: for metrics only


def test_metrics_disabled_render_no_endpoint_port_or_annotation() -> None:
    docs = render(VALUES["metrics-off"])
    specs, annotations, svcs = pod_specs(docs), pod_annotations(docs), services(docs)
    assert set(specs) == COMPONENTS
    for component, spec in specs.items():
        c = spec["containers"][0]
        assert not [a for a in c["args"] if a.startswith("--metrics")], component
        assert not [p for p in c.get("ports", []) if p["name"] == "metrics"], component
        assert not [k for k in annotations[component] if k.startswith("prometheus.io/")], component
    assert "--allow-metrics=false" in specs["triton"]["containers"][0]["args"]
    assert "stream-worker" not in svcs  # its Service exists only to name the metrics port
    for component, svc in svcs.items():
        assert not [p for p in svc["spec"].get("ports", []) if p["name"] == "metrics"], component
    assert "ServiceMonitor" not in {d["kind"] for d in docs}
    on = {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}}
    assert "ServiceMonitor" not in {d["kind"] for d in render(on)}  # metrics off wins


def test_metrics_port_and_annotations_follow_the_values() -> None:
    docs = render({"metrics": {"port": 9200, "podAnnotations": False}})
    specs, annotations = pod_specs(docs), pod_annotations(docs)
    for component in HISAM_COMPONENTS:
        c = specs[component]["containers"][0]
        assert "--metrics-port=9200" in c["args"] and "--metrics-addr=$(POD_IP)" in c["args"], component
        assert {"name": "metrics", "containerPort": 9200, "protocol": "TCP"} in c["ports"], component
    assert all(not a for a in annotations.values()), annotations  # endpoints stay, the annotations go
    assert services(docs)["rank-server"]["spec"]["ports"][-1]["port"] == 9200


def test_metrics_port_may_not_be_the_rank_port() -> None:
    with pytest.raises(helm_python.HelmRenderError, match="metrics.port and rankServer.port"):
        render({"metrics": {"port": 50051}})


def test_service_monitor_scrapes_every_component() -> None:
    docs = render(VALUES["service-monitor"])
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    spec = sm["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "targetLabels", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": ["recsys"]}
    assert spec["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    selector = spec["selector"]["matchLabels"]
    selected = {
        name
        for name, svc in services(docs).items()
        if selector.items() <= svc["metadata"]["labels"].items()
        and any(p["name"] == "metrics" for p in svc["spec"]["ports"])
    }
    assert selected == COMPONENTS
    assert all(
        label in d["metadata"]["labels"] for d in docs if d["kind"] == "Service" for label in spec["targetLabels"]
    )
    assert "ServiceMonitor" not in {d["kind"] for d in render(None)}  # off by default: needs the operator's CRDs
