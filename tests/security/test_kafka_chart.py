"""The chart's Kafka security (docs/operations.md "Security: Kafka"): kafka.tls / kafka.sasl pick
the protocol, kafka.existingSecret's keys are mounted read-only as files and only their paths
reach the stream workers' and the trainer's args, which the real ``hisam`` parser and
``infra.kafka_security`` accept; the schema refuses incomplete settings. Rendered offline with
tests/deploy/test_helm_chart.py's helpers (tests/security/test_chart_security.py checks that
no Secret name or key appears outside a reference)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import helm_python
import pytest

from infra.kafka_security import KafkaSecurity

_spec = importlib.util.spec_from_file_location(
    "_helm_chart_helpers_kafka", Path(__file__).resolve().parents[1] / "deploy" / "test_helm_chart.py"
)
chart = sys.modules["_helm_chart_helpers_kafka"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chart)

DIR = "/var/run/secrets/hisam/kafka"
MTLS_SCRAM = {
    "kafka": {
        "tls": {"enabled": True},
        "sasl": {"mechanism": "SCRAM-SHA-256"},
        "existingSecret": "kafka-creds",
        "secretKeys": {"username": "user", "password": "pass", "ca": "ca.pem", "cert": "crt.pem", "key": "key.pem"},
    }
}
KAFKA_CLIENTS = ("stream-worker", "trainer")


def security_of(values: dict | None) -> dict[str, tuple[KafkaSecurity, dict]]:
    """Per component: the KafkaSecurity its args give (parsed by the real CLI) and its pod spec."""
    from hisam import cli

    out = {}
    for component, spec in chart.pod_specs(chart.render(values)).items():
        if component in (*KAFKA_CLIENTS, "rank-server"):
            argv = spec["containers"][0]["args"]
            args = cli.build_parser(cli._match(argv)).parse_args(argv)
            sec = KafkaSecurity.from_args(args) if hasattr(args, "kafka_protocol") else None
            out[component] = (sec, spec)
    return out


def test_rank_servers_without_tombstones_get_no_kafka_credentials() -> None:
    values = {**MTLS_SCRAM, "rankServer": {"followTombstones": False}}
    sec, spec = security_of(values)["rank-server"]
    c = spec["containers"][0]
    assert sec in (None, KafkaSecurity()) and not any(a.startswith(("--kafka-", "--tombstones")) for a in c["args"])
    assert "kafka-credentials" not in {v["name"] for v in spec.get("volumes", [])}


def test_mutual_tls_and_scram_from_the_secret_as_files() -> None:
    for component, (sec, spec) in security_of(MTLS_SCRAM).items():
        c = spec["containers"][0]
        assert sec == KafkaSecurity(
            "SASL_SSL", "SCRAM-SHA-256", password_file=Path(f"{DIR}/password"), username_file=Path(f"{DIR}/username"),
            ca_file=Path(f"{DIR}/ca.crt"), cert_file=Path(f"{DIR}/tls.crt"), key_file=Path(f"{DIR}/tls.key"),
        ), component  # fmt: skip
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "kafka-credentials"]
        assert mount == {"name": "kafka-credentials", "mountPath": DIR, "readOnly": True}
        (vol,) = [v for v in spec["volumes"] if v["name"] == "kafka-credentials"]
        assert vol["secret"]["secretName"] == "kafka-creds" and vol["secret"]["defaultMode"] == 0o440
        assert {i["key"]: i["path"] for i in vol["secret"]["items"]} == {
            "user": "username", "pass": "password", "ca.pem": "ca.crt", "crt.pem": "tls.crt", "key.pem": "tls.key",
        }  # fmt: skip
        assert not [
            e for e in c.get("env", []) if e["name"].startswith("HISAM_KAFKA_") and e["name"] != "HISAM_KAFKA_BOOTSTRAP"
        ]


def test_production_values_use_tls_and_scram() -> None:
    for component in KAFKA_CLIENTS:
        sec, spec = security_of(chart.VALUES["production"])[component]
        assert (sec.protocol, sec.sasl_mechanism, sec.ca_file, sec.cert_file) == (
            "SASL_SSL", "SCRAM-SHA-512", Path(f"{DIR}/ca.crt"), None,
        )  # fmt: skip
        (vol,) = [v for v in spec["volumes"] if v["name"] == "kafka-credentials"]
        assert vol["secret"]["secretName"] == "hisam-kafka"


@pytest.mark.parametrize(
    ("kafka", "protocol"),
    [
        ({}, "PLAINTEXT"),
        ({"tls": {"enabled": True}}, "SSL"),
        ({"sasl": {"mechanism": "PLAIN"}, "existingSecret": "s"}, "SASL_PLAINTEXT"),
    ],
)
def test_the_protocol_follows_tls_and_sasl(kafka, protocol) -> None:
    for component in KAFKA_CLIENTS:
        sec, spec = security_of({"kafka": kafka})[component]
        assert sec.protocol == protocol, component
        mounted = "kafka-credentials" in {v["name"] for v in spec["volumes"]}
        assert mounted == (protocol == "SASL_PLAINTEXT"), component  # nothing to mount for TLS with the image's CAs


@pytest.mark.parametrize(
    ("kafka", "field"),
    [
        ({"sasl": {"mechanism": "SCRAM-SHA-512"}}, "existingSecret"),  # SASL without a Secret
        ({"sasl": {"mechanism": "GSSAPI"}, "existingSecret": "s"}, "/kafka/sasl/mechanism"),
        ({"existingSecret": "s", "secretKeys": {"ca": "ca.crt"}}, "/kafka/tls/enabled"),  # a CA without TLS
        ({"tls": {"enabled": True}, "secretKeys": {"ca": "ca.crt"}}, "existingSecret"),
        ({"tls": {"enabled": True}, "existingSecret": "s", "secretKeys": {"cert": "c"}}, "key"),  # cert without key
        ({"password": "hunter2"}, "password"),  # no place for a credential value
        ({"sasl": {"mechanism": "PLAIN", "password": "x"}, "existingSecret": "s"}, "password"),
    ],
)
def test_incomplete_kafka_security_is_refused_by_the_schema(kafka, field) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=field):
        chart.render({"kafka": kafka})
