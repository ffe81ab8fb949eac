"""The Helm chart, secure where it is deployed (docs/operations.md "The Helm chart"): credentials and
certificates only from Secrets (references, never values, in the manifests), NetworkPolicies that deny
what the data flow does not need, /metrics on the pod IP, and Rank probes that still work with TLS on.

Renders with the helpers of tests/deploy/test_helm_chart.py (loaded by path: test modules are not a
package), all offline."""

from __future__ import annotations

import concurrent.futures
import datetime
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import helm_python
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

_spec = importlib.util.spec_from_file_location(
    "_helm_chart_helpers", Path(__file__).resolve().parents[1] / "deploy" / "test_helm_chart.py"
)
chart = sys.modules["_helm_chart_helpers"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chart)

# Recognisable names: they may appear in the manifests only where a Secret is referenced.
REDIS_SECRET, REDIS_KEY = "zz-redis-secret-name", "zz-redis-secret-key"
TLS_SECRET, CA_SECRET = "zz-tls-secret-name", "zz-client-ca-secret-name"
AUTH_SECRET, AUTH_KEY = "zz-auth-secret-name", "zz-auth-secret-key"
KAFKA_SECRET = "zz-kafka-secret-name"
KAFKA_KEYS = {k: f"zz-kafka-{k}-key" for k in ("username", "password", "ca", "cert", "key")}
MARKERS = (REDIS_SECRET, REDIS_KEY, TLS_SECRET, CA_SECRET, AUTH_SECRET, AUTH_KEY, KAFKA_SECRET, *KAFKA_KEYS.values())
TLS_VALUES = {
    "kafka": {
        "tls": {"enabled": True},
        "sasl": {"mechanism": "SCRAM-SHA-256"},
        "existingSecret": KAFKA_SECRET,
        "secretKeys": KAFKA_KEYS,
    },
    "redis": {"existingSecret": REDIS_SECRET, "existingSecretKey": REDIS_KEY},
    "rankServer": {
        "tls": {"existingSecret": TLS_SECRET, "mutual": True, "clientCASecret": CA_SECRET},
        "auth": {"existingSecret": AUTH_SECRET, "key": AUTH_KEY},
    },
}
VALUES = {
    "default": None,
    "production": chart.VALUES["production"],
    "tls": TLS_VALUES,
    "tls-tcp-probe": {"rankServer": {"tls": {"existingSecret": TLS_SECRET, "probe": "tcp"}}},
}
HISAM = ("stream-worker", "trainer", "rank-server")


def policies(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix("hisam-"): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


def containers(docs: list[dict]) -> dict[str, dict]:
    return {name: spec["containers"][0] for name, spec in chart.pod_specs(docs).items()}


# --- render, lint, schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUES)
def test_renders_lints_and_validates(name: str) -> None:
    report = helm_python.lint(str(chart.CHART), VALUES[name], strict=True, kube_version=f"v{chart.KUBE}")
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]
    docs = chart.render(VALUES[name])
    assert "NetworkPolicy" in {d["kind"] for d in docs}  # on by default
    for doc in docs:
        kubernetes_validate.validate(doc, chart.KUBE, strict=True)


@pytest.mark.parametrize("name", VALUES)
def test_args_parse_with_the_real_cli(name: str) -> None:
    from hisam import cli

    for component, c in containers(chart.render(VALUES[name])).items():
        if component in HISAM:
            argv = c["args"]
            assert cli.build_parser(cli._match(argv)).parse_args(argv)._module.startswith("hisam.jobs."), component


# --- credentials only from Secrets ---------------------------------------------------------------------


def _occurrences(node, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _occurrences(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _occurrences(v, (*path, i))
    elif isinstance(node, str):
        yield path, node


def _where(path: tuple) -> str:
    """Where a string sits, with list indices dropped: 'env.valueFrom.secretKeyRef.name'."""
    return ".".join(str(p) for p in path if not isinstance(p, int))


# Where a Secret's name or key may appear: references the kubelet resolves, never a value.
REFERENCE_PLACES = (
    "env.valueFrom.secretKeyRef.name",
    "env.valueFrom.secretKeyRef.key",
    "volumes.secret.secretName",
    "volumes.secret.items.key",
)


@pytest.mark.parametrize("name", ["tls", "production"])
def test_secrets_are_referenced_never_inlined(name: str) -> None:
    docs = chart.render(VALUES[name])
    markers = MARKERS if name == "tls" else ("hisam-redis", "hisam-rank-tls", "hisam-rank-tokens", "hisam-kafka")
    seen = set()
    for doc in docs:
        for path, text in _occurrences(doc):
            for marker in markers:
                if marker in text:
                    assert _where(path).endswith(REFERENCE_PLACES), (doc["kind"], _where(path), text)
                    seen.add(marker)
    assert seen == set(markers)  # every Secret is used
    for component, c in containers(docs).items():
        # the paths of files mounted from Secrets (--kafka-password-file=/var/run/secrets/...) are references
        args = [a for a in c.get("args", []) if not (a.startswith("--") and "-file=/var/run/secrets/" in a)]
        blob = yaml.safe_dump({"args": args, "env": [e for e in c.get("env", []) if "value" in e]})
        for needle in ("redis://", "rediss://", "BEGIN ", "Bearer", "password"):
            assert needle not in blob, (component, needle)
        for arg in c.get("args", []):
            assert not arg.startswith("--redis-url"), component  # from HISAM_REDIS_URL (the Secret), not args
    env = {e["name"]: e for e in containers(docs)["rank-server"]["env"]}
    assert "value" not in env["HISAM_REDIS_URL"] and env["HISAM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert "HISAM_REDIS_URL" not in {e["name"] for e in containers(docs)["trainer"]["env"]}  # needs no Redis


def test_tls_and_token_files_are_mounted_and_passed_as_paths() -> None:
    docs = chart.render(TLS_VALUES)
    spec = chart.pod_specs(docs)["rank-server"]
    c = spec["containers"][0]
    assert {
        "--tls-cert=/etc/hisam/tls/tls.crt",
        "--tls-key=/etc/hisam/tls/tls.key",
        "--tls-client-ca=/etc/hisam/client-ca/ca.crt",
        "--auth-token-file=/etc/hisam/auth/tokens",
    } <= set(c["args"])
    assert "--reflection" not in c["args"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert all(mounts[v]["readOnly"] and "subPath" not in mounts[v] for v in ("tls", "client-ca", "auth"))
    volumes = {v["name"]: v.get("secret") for v in spec["volumes"]}
    assert volumes["tls"]["secretName"] == TLS_SECRET
    assert [i["key"] for i in volumes["tls"]["items"]] == ["tls.crt", "tls.key", "ca.crt"]
    assert volumes["client-ca"]["secretName"] == CA_SECRET
    assert volumes["auth"] == {
        "secretName": AUTH_SECRET,
        "defaultMode": 0o440,
        "items": [{"key": AUTH_KEY, "path": "tokens"}],
    }
    # Off by default: plaintext, no token, no secret volume.
    default = chart.pod_specs(chart.render(None))["rank-server"]
    assert not [a for a in default["containers"][0]["args"] if a.startswith(("--tls", "--auth"))]
    assert not [v for v in default["volumes"] if "secret" in v]


@pytest.mark.parametrize(
    "values, field",
    [
        ({"redis": {"url": "redis://:hunter2@cache:6379/0"}}, "/redis/url"),
        ({"redis": {"url": "rediss://app:hunter2@cache:6380/0"}}, "/redis/url"),
        ({"redis": {"url": "redis://cache:6379/0?password=hunter2"}}, "/redis/url"),
        ({"redis": {"existingSecret": "Not_A_Name"}}, "/redis/existingSecret"),
        ({"rankServer": {"tls": {"mutual": True}}}, "/rankServer/tls"),  # mutual TLS needs TLS
        ({"rankServer": {"tls": {"probe": "grpc"}}}, "/rankServer/tls/probe"),
        ({"networkPolicy": {"rankClients": [{"podSelectr": {}}]}}, "/networkPolicy/rankClients"),
        ({"networkPolicy": {"egress": {"redis": {"ports": [0]}}}}, "/networkPolicy/egress/redis/ports"),
    ],
)
def test_the_schema_refuses_credentials_in_values_and_bad_security_settings(values: dict, field: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=field):
        chart.render(values)


def test_production_values_carry_no_credential() -> None:
    prod = chart.VALUES["production"]
    assert "url" not in prod["redis"] and prod["redis"]["existingSecret"]
    assert prod["rankServer"]["tls"]["existingSecret"] and prod["rankServer"]["auth"]["existingSecret"]
    assert not [v for v in prod["redis"].values() if "@" in str(v)]  # no user:password@ anywhere


# --- metrics on the pod IP ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "tls"])
def test_metrics_bind_to_the_pod_ip(name: str) -> None:
    for component, c in containers(chart.render(VALUES[name])).items():
        if component in HISAM:
            assert "--metrics-addr=$(POD_IP)" in c["args"] and "--metrics-addr=0.0.0.0" not in c["args"], component
            env = {e["name"]: e for e in c["env"]}
            assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, component


# --- NetworkPolicies ------------------------------------------------------------------------------------


def test_default_deny_selects_every_pod_of_the_release() -> None:
    docs = chart.render(None)
    nps = policies(docs)
    deny = nps["default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert deny["podSelector"]["matchLabels"].items() <= labels.items(), component
            assert nps[component]["podSelector"]["matchLabels"].items() <= labels.items(), component
            assert nps[component]["policyTypes"] == ["Ingress", "Egress"], component
    assert "NetworkPolicy" not in {d["kind"] for d in chart.render({"networkPolicy": {"enabled": False}})}


def _rule_ports(rule: dict) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


def _component(name: str) -> dict:
    return {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "hisam",
                "app.kubernetes.io/instance": "hisam",
                "app.kubernetes.io/component": name,
            }
        }
    }


def test_the_allow_rules_follow_the_data_flow() -> None:
    clients = [{"namespaceSelector": {"matchLabels": {"team": "backend"}}}]
    scrapers = [{"ipBlock": {"cidr": "10.9.0.0/16"}}]
    values = {
        "kafka": {"bootstrap": "b1:9093,b2:9093,b3:9094"},
        "redis": {"url": "rediss://cache:6380/1"},
        "networkPolicy": {"rankClients": clients, "metricsScrapers": scrapers},
    }
    nps = policies(chart.render(values))
    dns = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    kafka = {"ports": [{"port": 9093, "protocol": "TCP"}, {"port": 9094, "protocol": "TCP"}]}  # any address
    redis = {"ports": [{"port": 6380, "protocol": "TCP"}]}
    triton = {"ports": [{"port": 8001, "protocol": "TCP"}], "to": [_component("triton")]}

    def metrics(port: int) -> dict:
        return {"from": scrapers, "ports": [{"port": port, "protocol": "TCP"}]}

    assert nps["rank-server"]["ingress"] == [
        {"from": clients, "ports": [{"port": 50051, "protocol": "TCP"}]},
        metrics(9100),
    ]
    assert nps["rank-server"]["egress"] == [triton, redis, kafka, dns]  # kafka: user-tombstones
    off = policies(chart.render({**values, "rankServer": {"followTombstones": False}}))
    assert off["rank-server"]["egress"] == [triton, redis, dns]
    assert nps["stream-worker"]["ingress"] == [metrics(9100)]
    assert nps["stream-worker"]["egress"] == [kafka, redis, dns]
    assert nps["trainer"]["ingress"] == [metrics(9100)]
    assert nps["trainer"]["egress"] == [kafka, triton, dns]
    # Triton's gRPC only from the Rank servers and the trainer; it opens nothing.
    grpc_rule = {
        "from": [_component("rank-server"), _component("trainer")],
        "ports": [{"port": 8001, "protocol": "TCP"}],
    }
    assert nps["triton"]["ingress"] == [grpc_rule, metrics(8002)]
    assert nps["triton"]["egress"] == []


def test_endpoint_peers_ports_and_switches() -> None:
    kafka_to = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}}}]
    values = {
        "redis": {"existingSecret": "r"},  # the URL is hidden: 6379 unless told
        "networkPolicy": {"egress": {"kafka": {"ports": [9095], "to": kafka_to}}, "rankClients": []},
    }
    nps = policies(chart.render(values))
    assert nps["stream-worker"]["egress"][:2] == [
        {"ports": [{"port": 9095, "protocol": "TCP"}], "to": kafka_to},
        {"ports": [{"port": 6379, "protocol": "TCP"}]},
    ]
    assert [_rule_ports(r) for r in nps["rank-server"]["ingress"]] == [{(9100, "TCP")}]  # no client: none allowed
    # Egress off: ingress only; metrics off: no scrape rule.
    nps = policies(chart.render({"networkPolicy": {"egress": {"enabled": False}}, "metrics": {"enabled": False}}))
    assert all(np["policyTypes"] == ["Ingress"] and "egress" not in np for np in nps.values())
    assert nps["stream-worker"]["ingress"] == [] and len(nps["triton"]["ingress"]) == 1
    nps = policies(chart.render({"networkPolicy": {"rankClients": [], "metricsScrapers": []}}))
    assert nps["rank-server"]["ingress"] == [] and nps["trainer"]["ingress"] == []  # none allowed, not all


# --- Rank probes with TLS on ------------------------------------------------------------------------------


def test_probes_follow_tls() -> None:
    plain = containers(chart.render(None))["rank-server"]
    assert plain["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    tcp = containers(chart.render(VALUES["tls-tcp-probe"]))["rank-server"]
    assert all(tcp[p]["tcpSocket"] == {"port": "grpc"} for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    tls = containers(chart.render(TLS_VALUES))["rank-server"]
    for probe, service in (("startupProbe", ""), ("readinessProbe", ""), ("livenessProbe", "liveness")):
        cmd = tls[probe]["exec"]["command"]
        assert cmd[0] == "python" and cmd[3:] == [
            "50051",
            "hisam-rank-server.recsys.svc",
            service,
            "/etc/hisam/tls/ca.crt",
            "/etc/hisam/tls/tls.crt",
            "/etc/hisam/tls/tls.key",
        ], probe


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(name: str, key, issuer_key=None, issuer=None, *, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # also the probe's client cert
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    """What the chart mounts at /etc/hisam/tls: a CA, and a server certificate for the Service's name."""
    d = tmp_path_factory.mktemp("tls")
    ca_key, key = _key(), _key()
    ca = _cert("hisam test CA", ca_key, ca=True)
    cert = _cert("hisam-rank-server.recsys.svc", key, ca_key, ca)
    pem = serialization.Encoding.PEM
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "tls.crt").write_bytes(cert.public_bytes(pem))
    (d / "tls.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_the_exec_probe_checks_health_over_tls(tls_dir: Path, mutual: bool) -> None:
    """The rendered probe command, run against a gRPC server with the same TLS set-up and health service."""
    values = {"rankServer": {"tls": {"existingSecret": "t", "mutual": mutual}}}
    c = containers(chart.render(values))["rank-server"]
    read = lambda name: (tls_dir / name).read_bytes()
    creds = grpc.ssl_server_credentials(
        [(read("tls.key"), read("tls.crt"))],
        root_certificates=read("ca.crt") if mutual else None,
        require_client_auth=mutual,
    )
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()

    def probe(name: str, **swap: str) -> subprocess.CompletedProcess:
        cmd = c[name]["exec"]["command"]
        argv = [sys.executable, *cmd[1:3], str(port)] + [swap.get(a, a) for a in cmd[4:]]
        argv = [a.replace("/etc/hisam/tls", str(tls_dir)) for a in argv]
        return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)

    try:
        for service in ("", "liveness"):
            servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        assert probe("readinessProbe").returncode == 0, probe("readinessProbe").stderr
        assert probe("livenessProbe").returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        out = probe("readinessProbe")
        assert out.returncode != 0 and "NOT_SERVING" in out.stderr
        assert probe("livenessProbe").returncode == 0  # liveness does not follow the dependencies
        out = probe("livenessProbe", **{"hisam-rank-server.recsys.svc": "someone-else.svc"})
        assert out.returncode != 0 and "UNAVAILABLE" in out.stderr  # the server's name is verified
    finally:
        server.stop(None)
