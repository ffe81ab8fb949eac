"""Kafka security settings (infra/kafka_security.py): contradictions refused, the password read
from its file, and the SASL settings reaching every client the project makes: kafka-python's
(infra/kafka.py), aiokafka's, the faust worker's consumer and producer, and the ``hisam``
commands' options. No broker here speaks SCRAM (the embedded one accepts SASL PLAIN only, and
tests/security/test_kafka_tls.py runs that for real), so the SCRAM settings are checked on
the clients' own configuration."""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from infra import kafka_security as ks
from infra.kafka_security import KafkaSecurity, KafkaSecurityError

PASSWORD = "pw-Kafka-7f3a"
UNREACHABLE = "127.0.0.1:1"  # faust and aiokafka clients do not connect when made


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    from pki import _cert, _key, _write_pair

    ca_key, ck = _key(), _key()
    ca = _cert("hisam kafka settings CA", ca_key, ca=True)
    ca_file, _ = _write_pair(tmp_path, "ca", ca, ca_key)
    cert, key = _write_pair(tmp_path, "client", _cert("client", ck, ca, ca_key), ck)
    pw = tmp_path / "kafka_password"
    pw.write_text(PASSWORD + "\n")
    return {"ca": ca_file, "cert": cert, "key": key, "password": pw}


def scram(files, protocol: str = "SASL_SSL", mechanism: str = "SCRAM-SHA-512") -> KafkaSecurity:
    tls = (
        {"ca_file": files["ca"], "cert_file": files["cert"], "key_file": files["key"]} if protocol == "SASL_SSL" else {}
    )
    return KafkaSecurity(protocol, mechanism, "hisam-worker", files["password"], **tls)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"protocol": "PLAINTEXT", "sasl_mechanism": "PLAIN"}, "--kafka-sasl-mechanism given but"),
        ({"protocol": "SSL", "username": "u"}, "--kafka-username given but --kafka-security-protocol is SSL"),
        ({"protocol": "SASL_SSL", "username": "u", "password_file": "p"}, "SASL_SSL needs --kafka-sasl-mechanism"),
        ({"protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "username": "u"}, "needs --kafka-password-file"),
        ({"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI", "username": "u", "password_file": "p"}, "one of"),
        ({"protocol": "PLAINTEXT", "ca_file": "ca.pem"}, "--kafka-tls-ca given but"),
        ({"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "username": "u", "password_file": "p",
          "ca_file": "ca.pem"}, "without TLS"),
        ({"protocol": "SSL", "cert_file": "c.pem"}, "--kafka-tls-cert and --kafka-tls-key go together"),
        ({"protocol": "TLS"}, "one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ],
)  # fmt: skip
def test_contradictory_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(KafkaSecurityError, match=message.replace("-", r"\-")):
        KafkaSecurity(**kwargs)


def test_client_settings_sasl_ssl(files) -> None:
    sec = scram(files)
    kp = sec.kafka_python_kwargs()
    assert kp["security_protocol"] == "SASL_SSL" and kp["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kp["sasl_plain_username"] == "hisam-worker" and kp["sasl_plain_password"] == PASSWORD  # newline dropped
    ctx = kp["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname and kp["ssl_check_hostname"]
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    aio = sec.aiokafka_kwargs()
    assert {k: aio[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password")} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "hisam-worker", "sasl_plain_password": PASSWORD,
    }  # fmt: skip
    assert isinstance(aio["ssl_context"], ssl.SSLContext)
    cred = sec.faust_credentials()
    assert (cred.protocol.value, cred.mechanism.value, cred.username, cred.password) == (
        "SASL_SSL", "SCRAM-SHA-512", "hisam-worker", PASSWORD,
    )  # fmt: skip
    ssl_only = KafkaSecurity("SSL", ca_file=files["ca"])
    assert ssl_only.faust_credentials().protocol.value == "SSL"
    assert "sasl_mechanism" not in ssl_only.kafka_python_kwargs()
    assert KafkaSecurity().kafka_python_kwargs() == {} and KafkaSecurity().faust_credentials() is None


def test_password_is_read_from_its_file_each_time_and_never_shown(files) -> None:
    sec = scram(files, "SASL_PLAINTEXT", "SCRAM-SHA-256")
    assert sec.kafka_python_kwargs()["sasl_plain_password"] == PASSWORD
    files["password"].write_text("rotated-9c1\n")
    assert sec.aiokafka_kwargs()["sasl_plain_password"] == "rotated-9c1"  # a rotation needs no new setting
    shown = " ".join([repr(sec), *sec.args(), *sec.env().values(), repr(sec.faust_credentials())])
    assert "rotated-9c1" not in shown and PASSWORD not in shown
    files["password"].write_text("")
    with pytest.raises(KafkaSecurityError, match="is empty"):
        sec.kafka_python_kwargs()
    gone = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "u", files["password"].parent / "missing")
    with pytest.raises(KafkaSecurityError, match="--kafka-password-file .*missing"):
        gone.aiokafka_kwargs()
    with pytest.raises(KafkaSecurityError, match="--kafka-tls-ca .*no such file"):
        KafkaSecurity("SSL", ca_file=files["ca"].parent / "nope.pem").ssl_context()


def test_environment_and_options_carry_the_same_setting(files, monkeypatch) -> None:
    sec = scram(files)
    assert KafkaSecurity.from_env(sec.env()) == sec
    assert KafkaSecurity.from_env({}) == KafkaSecurity()
    parser = argparse.ArgumentParser()
    ks.add_arguments(parser)
    assert KafkaSecurity.from_args(parser.parse_args(sec.args())) == sec
    for var, value in sec.env().items():
        monkeypatch.setenv(var, value)
    env_parser = argparse.ArgumentParser()
    ks.add_arguments(env_parser)  # defaults from the environment
    assert KafkaSecurity.from_args(env_parser.parse_args([])) == sec
    assert ks.active() == sec  # nothing configured: the environment's


@pytest.mark.kafka
def test_sasl_reaches_every_kafka_python_client(files, kafka_bootstrap) -> None:
    """infra.kafka's clients, the stream's producer and topic admin take the process's setting,
    and use it: the embedded broker accepts SASL PLAIN (any password), so the handshake runs
    for real here."""
    from infra import kafka
    from stream import producer as prod
    from stream import topics as tp

    sec = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "hisam-worker", files["password"])
    want = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "hisam-worker", "sasl_plain_password": PASSWORD}  # fmt: skip
    made = []
    try:
        with ks.using(sec):  # the process's setting, as a command's --kafka-* options make it
            made.append(kafka.KafkaConsumer(bootstrap_servers=kafka_bootstrap))
            made.append(prod.make_producer(kafka_bootstrap))
            made.append(kafka.admin_client(kafka_bootstrap, "hisam-sasl-test"))
            offsets = kafka.Offsets(kafka_bootstrap, "hisam-sasl-offsets")
            made += [offsets.consumer, offsets.admin]
            tp.ensure_topics(kafka_bootstrap, tp.default_topics(1))
        # an explicit setting wins over the process's (here: none)
        made.append(kafka.KafkaConsumer(bootstrap_servers=kafka_bootstrap, security=sec))
        for client in made:
            assert {k: client.config[k] for k in want} == want, type(client)
        assert tp.USER_ACTIONS in made[0].topics()  # requests answered over the SASL connection
        made[1].send(tp.USER_ACTIONS, b"sasl", key=b"1").get(30)
    finally:
        for client in made:
            client.close()
    plain = kafka.KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert plain.config["security_protocol"] == "PLAINTEXT"
    finally:
        plain.close()


def test_sasl_reaches_the_workers_faust_consumer_and_producer(files, tmp_path) -> None:
    """The worker's faust app takes the process's setting as broker_credentials, and faust's
    transport builds its aiokafka consumer and producer with them (built, not started)."""
    from features.store import OnlineStoreConfig
    from stream.app import StreamSettings, _faust_app

    sec = scram(files, "SASL_SSL", "SCRAM-SHA-256")

    async def build():
        with ks.using(sec):
            app = _faust_app(StreamSettings(UNREACHABLE, OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path)))
        producer = app.producer._new_producer()
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return app, producer.client, consumer._client
        finally:
            await producer.stop()
            await consumer.stop()

    app, pclient, cclient = asyncio.run(build())
    assert app.conf.broker_credentials.protocol.value == "SASL_SSL"
    for client in (pclient, cclient):
        got = (client._security_protocol, client._sasl_mechanism, client._sasl_plain_username)
        assert got == ("SASL_SSL", "SCRAM-SHA-256", "hisam-worker")
        assert client._sasl_plain_password == PASSWORD
        assert isinstance(client._ssl_context, ssl.SSLContext)


def test_aiokafka_takes_the_settings(files) -> None:
    """What the freshness load generator passes to AIOKafkaProducer (hisam/bench/stream/freshness.py)."""
    from aiokafka import AIOKafkaProducer

    sec = scram(files, "SASL_PLAINTEXT", "PLAIN")

    async def build():
        p = AIOKafkaProducer(bootstrap_servers=UNREACHABLE, **sec.aiokafka_kwargs())
        try:
            return p.client
        finally:
            await p.stop()

    client = asyncio.run(build())
    assert (client._security_protocol, client._sasl_mechanism, client._sasl_plain_password) == (
        "SASL_PLAINTEXT", "PLAIN", PASSWORD,
    )  # fmt: skip


@pytest.mark.parametrize("module", ["stream_worker", "trainer_run", "events_produce", "tokenizer_migrate"])
def test_every_kafka_command_takes_the_options(module, files, monkeypatch) -> None:
    import importlib

    from hisam import cli

    for var in ks.ENV.values():
        monkeypatch.setenv(var, "")  # restored (to unset) after the test, whatever configure sets
        monkeypatch.delenv(var)
    monkeypatch.setattr(ks, "_active", None)
    parser = argparse.ArgumentParser()
    importlib.import_module(f"hisam.jobs.{module}").add_arguments(parser)
    sec = scram(files)
    required = ["--tokenizer", "x"] if module == "tokenizer_migrate" else []
    args = parser.parse_args([*required, *sec.args()])
    cli._configure_kafka_security(args)
    assert ks.active() == sec
    assert KafkaSecurity.from_env(os.environ) == sec  # exported for the processes it starts
    assert PASSWORD not in " ".join(os.environ.get(v, "") for v in ks.ENV.values())


def test_a_worker_refuses_contradictory_options(files) -> None:
    """A real ``hisam stream worker`` process exits at once with the reason."""
    res = subprocess.run(
        [sys.executable, "-m", "hisam.jobs.stream_worker", "--bootstrap", UNREACHABLE,
         "--kafka-security-protocol", "SASL_SSL", "--kafka-username", "u", "--kafka-password-file",
         str(files["password"])],
        capture_output=True, text=True, timeout=120, check=False, cwd=Path(__file__).resolve().parents[2],
        env={k: v for k, v in os.environ.items() if k not in ks.ENV.values()},
    )  # fmt: skip
    assert res.returncode != 0
    assert "SASL_SSL needs --kafka-sasl-mechanism" in res.stderr, res.stderr[-2000:]


def test_user_from_a_file(files, tmp_path) -> None:
    """The chart mounts the user from the Secret as a file (--kafka-username-file)."""
    user_file = tmp_path / "kafka_username"
    user_file.write_text("svc-hisam\n")
    sec = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", password_file=files["password"], username_file=user_file)
    assert sec.kafka_python_kwargs()["sasl_plain_username"] == "svc-hisam"
    assert sec.faust_credentials().username == "svc-hisam"
    assert KafkaSecurity.from_env(sec.env()) == sec
    with pytest.raises(KafkaSecurityError, match="not both"):
        KafkaSecurity("SASL_SSL", "PLAIN", "u", files["password"], username_file=user_file)
    with pytest.raises(KafkaSecurityError, match=r"\-\-kafka\-username\-file given but"):
        KafkaSecurity("SSL", username_file=user_file)
