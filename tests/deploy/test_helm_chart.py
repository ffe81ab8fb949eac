"""The Helm chart (deploy/helm/hisam): renders for default and production-like values, passes
strict lint, and every manifest validates against the Kubernetes 1.30 schemas, all offline."""

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
VALUES = {"default": None, "production": yaml.safe_load(PRODUCTION.read_text())}
COMPONENTS = {"stream-worker", "trainer", "triton", "rank-server"}


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
    assert "grpc" in specs["rank-server"]["containers"][0]["readinessProbe"]  # grpc.health.v1


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
        assert env["HISAM_REDIS_URL"] == "rediss://cache:6380/2", component
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
    ],
)
def test_bad_values_are_refused_by_the_schema(values: dict, field: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=field):
        render(values)


def test_disabled_components_render_nothing() -> None:
    off = {c: {"enabled": False} for c in ("streamWorker", "trainer", "triton", "rankServer")}
    kinds = {d["kind"] for d in render(off)}
    assert kinds == {"ServiceAccount", "PersistentVolumeClaim"}


@pytest.mark.parametrize("name", VALUES)
def test_container_args_parse_with_the_real_cli(name: str) -> None:
    """Every hisam container's args are accepted by the ``hisam`` parser (a renamed flag fails here, not in a pod)."""
    from hisam import cli

    specs = pod_specs(render(VALUES[name]))
    for component in ("stream-worker", "trainer", "rank-server"):
        argv = specs[component]["containers"][0]["args"]
        args = cli.build_parser(cli._match(argv)).parse_args(argv)
        assert args._module.startswith("hisam.jobs."), component
