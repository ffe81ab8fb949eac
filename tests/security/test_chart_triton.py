"""The chart's Triton hop (deploy/helm/hisam, values ``triton.access`` and ``triton.tls``): restricted
APIs and mutual TLS on Triton, the client key and certificates mounted into the Rank servers and the
trainer, every credential a Secret reference.

The flags Triton gets are compared with ``TritonAccess.server_args`` (infra/triton_access.py), which
tests/security/test_triton_access.py runs against a real tritonserver: the chart says what the
tested code says. Rendered offline with the helpers of tests/deploy/test_helm_chart.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest

from infra.triton_access import TritonAccess

_spec = importlib.util.spec_from_file_location(
    "_helm_chart_helpers", Path(__file__).resolve().parents[1] / "deploy" / "test_helm_chart.py"
)
chart = sys.modules.setdefault("_helm_chart_helpers", importlib.util.module_from_spec(_spec))
if not hasattr(chart, "render"):
    _spec.loader.exec_module(chart)

KEYS, TLS, CLIENT = "zz-triton-keys", "zz-triton-tls", "zz-triton-client"
CLIENT_KEY, ADMIN_KEY = "zz-client-key-name", "zz-admin-key-name"
VALUES = {
    "triton": {
        "access": {"existingSecret": KEYS, "clientKey": CLIENT_KEY, "adminKey": ADMIN_KEY},
        "tls": {"existingSecret": TLS, "mutual": True, "clientSecret": CLIENT},
    }
}


def _containers(docs) -> dict[str, dict]:
    return {name: spec["containers"][0] for name, spec in chart.pod_specs(docs).items()}


def test_renders_lints_and_validates_with_triton_access_and_tls() -> None:
    report = helm_python.lint(str(chart.CHART), VALUES, strict=True, kube_version=f"v{chart.KUBE}")
    assert report["errors"] == [], report
    for doc in chart.render(VALUES):
        kubernetes_validate.validate(doc, chart.KUBE, strict=True)


def test_triton_flags_are_the_tested_ones_and_its_keys_only_references(tmp_path) -> None:
    docs = chart.render(VALUES)
    triton = _containers(docs)["triton"]
    env = {e["name"]: e for e in triton["env"]}
    assert all("value" not in e for e in env.values())
    assert env["HISAM_TRITON_CLIENT_KEY"]["valueFrom"]["secretKeyRef"] == {"name": KEYS, "key": CLIENT_KEY}
    assert env["HISAM_TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": KEYS, "key": ADMIN_KEY}
    # What Kubernetes passes once it substitutes $(VAR), against what the tested code passes.
    (tmp_path / "c").write_text("ck\n")
    (tmp_path / "a").write_text("ak\n")
    args = [
        a.replace("$(HISAM_TRITON_CLIENT_KEY)", "ck").replace("$(HISAM_TRITON_ADMIN_KEY)", "ak") for a in triton["args"]
    ]
    restricted = [a for a in args if "restricted" in a]
    assert restricted == [a for a in TritonAccess(key_file=tmp_path / "c", admin_key_file=tmp_path / "a").server_args()]
    tls = TritonAccess(
        tls_cert=Path("/etc/hisam/tls/tls.crt"),
        tls_key=Path("/etc/hisam/tls/tls.key"),
        tls_client_ca=Path("/etc/hisam/tls/ca.crt"),
    ).server_args()
    assert [a for a in args if a.startswith("--grpc-") and "restricted" not in a and "port" not in a] == tls
    volumes = {v["name"]: v.get("secret") for v in chart.pod_specs(docs)["triton"]["volumes"]}
    assert volumes["tls"]["secretName"] == TLS
    assert [i["key"] for i in volumes["tls"]["items"]] == ["tls.crt", "tls.key", "ca.crt"]
    # the probes stay on the open HTTP health endpoint
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_rank_server_and_trainer_get_the_client_key_and_certificates_as_files() -> None:
    from hisam import cli

    docs = chart.render(VALUES)
    specs = chart.pod_specs(docs)
    for component in ("rank-server", "trainer"):
        c = specs[component]["containers"][0]
        assert {
            "--triton-key-file=/etc/hisam/triton-key/client-key",
            "--triton-tls-ca=/etc/hisam/triton-ca/ca.crt",
            "--triton-tls-cert=/etc/hisam/triton-client/tls.crt",
            "--triton-tls-key=/etc/hisam/triton-client/tls.key",
        } <= set(c["args"]), component
        parsed = cli.build_parser(cli._match(c["args"])).parse_args(c["args"])
        assert str(parsed.triton_key_file) == "/etc/hisam/triton-key/client-key", component
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert all(mounts[n]["readOnly"] and "subPath" not in mounts[n] for n in ("triton-key", "triton-ca")), component
        volumes = {v["name"]: v.get("secret") for v in specs[component]["volumes"]}
        assert volumes["triton-key"]["secretName"] == KEYS
        assert volumes["triton-key"]["items"] == [{"key": CLIENT_KEY, "path": "client-key"}]
        assert volumes["triton-ca"]["secretName"] == TLS
        assert volumes["triton-ca"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # not Triton's key
        assert volumes["triton-client"]["secretName"] == CLIENT
        assert ADMIN_KEY not in str(specs[component])  # the admin key is Triton's and operators' only


def test_off_by_default_and_on_in_production() -> None:
    default = _containers(chart.render(None))
    assert not [a for a in default["triton"]["args"] if "restricted" in a or "ssl" in a]
    assert "env" not in default["triton"]
    for component in ("rank-server", "trainer"):
        assert not [a for a in default[component]["args"] if a.startswith("--triton-") and "url" not in a]
    prod = _containers(chart.render(chart.VALUES["production"]))
    assert any(a.startswith("--grpc-restricted-protocol=model-repository") for a in prod["triton"]["args"])
    assert "--grpc-use-ssl-mutual=true" in prod["triton"]["args"]
    assert "--triton-tls-cert=/etc/hisam/triton-client/tls.crt" in prod["rank-server"]["args"]


@pytest.mark.parametrize(
    "values, field",
    [
        ({"triton": {"tls": {"mutual": True}}}, "/triton/tls"),
        ({"triton": {"tls": {"existingSecret": "a", "mutual": True}}}, "/triton/tls"),
        ({"triton": {"access": {"existingSecret": "Bad_Name"}}}, "/triton/access/existingSecret"),
        ({"triton": {"access": {"key": "s3cret"}}}, "/triton/access"),
    ],
)
def test_the_schema_refuses_bad_triton_security_values(values: dict, field: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=field):
        chart.render(values)
