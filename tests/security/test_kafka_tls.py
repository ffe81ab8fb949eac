"""Kafka over real TLS (docs/operations.md "Security: Kafka"): the embedded broker behind
stunnel, in its own network namespace so that its advertised address is the TLS one
(infra/kafka_tls.py), with mutual TLS (a client certificate required).

- kafka-python and aiokafka round trips, topic admin and group offsets, over TLS, and SASL
  PLAIN over TLS (SASL_SSL; the embedded broker accepts PLAIN without checking the password);
- a plaintext client, a client that does not trust the server's CA and one without a client
  certificate all fail;
- a real ``hisam stream worker`` process appends over TLS (``--kafka-*`` options), and its
  training samples are read back by the trainer's consumer over TLS.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from pki import _cert, _key, _write_pair

from features.store import OnlineStoreConfig, open_stream_store
from infra import kafka
from infra import kafka_security as ks
from infra.kafka_security import KafkaSecurity
from infra.kafka_tls import tls_kafka_broker
from infra.stunnel import TlsFiles
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.testing import WorkerProcess, wait_until

pytestmark = [pytest.mark.kafka]

N_CODES = 6
RUN = uuid.uuid4().hex[:8]
BASE = 8_000_000_000 + (uuid.uuid4().int % 1_000_000) * 1000
SHORT = {"request_timeout_ms": 4000, "bootstrap_timeout_ms": 6000}  # failing clients fail fast


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("kafka-pki")
    ca_key, server_key, client_key, other_key = _key(), _key(), _key(), _key()
    ca = _cert("hisam kafka test CA", ca_key, ca=True)
    ca_file, _ = _write_pair(d, "ca", ca, ca_key)
    other_ca, _ = _write_pair(d, "other-ca", _cert("another CA", other_key, ca=True), other_key)
    server = _write_pair(d, "server", _cert("localhost", server_key, ca, ca_key, server=True), server_key)
    client = _write_pair(d, "client", _cert("hisam-worker", client_key, ca, ca_key), client_key)
    pw = d / "kafka_password"
    pw.write_text("pw-Kafka-tls-51d0\n")
    return {"ca": ca_file, "other_ca": other_ca, "server": server, "client": client, "password": pw}


@pytest.fixture(scope="module")
def broker(pki, stunnel_binary):
    cert, key = pki["server"]
    with tls_kafka_broker(TlsFiles(cert, key, client_ca=pki["ca"])) as b:
        yield b


@pytest.fixture(scope="module")
def tls(pki) -> KafkaSecurity:
    cert, key = pki["client"]
    return KafkaSecurity("SSL", ca_file=pki["ca"], cert_file=cert, key_file=key)


def test_round_trip_over_tls(broker, tls, pki) -> None:
    topic = f"tls-{RUN}"
    with ks.using(tls):
        tp.ensure_topics(broker.bootstrap, [tp.TopicSpec(topic, 2)])
        producer = prod.make_producer(broker.bootstrap, linger_ms=1)
        consumer = kafka.consumer(broker.bootstrap, group_id=f"g-{RUN}", auto_offset_reset="earliest")
    try:
        for i in range(10):
            producer.send(topic, f"v{i}".encode(), key=str(i).encode())
        producer.flush(30)
        consumer.subscribe([topic])
        got: list[bytes] = []
        wait_until(lambda: got.extend(r.value for rs in consumer.poll(500).values() for r in rs) or len(got) >= 10, 60)
        assert sorted(got) == sorted(f"v{i}".encode() for i in range(10))
        consumer.commit()
        # every broker the clients know is the TLS address: metadata advertises stunnel's port
        assert {(b.host, b.port) for b in consumer._client.cluster.brokers()} == {(broker.host, broker.port)}
        assert producer.config["security_protocol"] == "SSL"
    finally:
        producer.close()
        consumer.close()
    with ks.using(tls):
        offsets = kafka.Offsets(broker.bootstrap)
    try:
        assert offsets.position(f"g-{RUN}", topic) == (10, 0)  # admin and consumer over TLS
    finally:
        offsets.close()

    # aiokafka (the worker's library, and the freshness load generator's producer)
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    async def aio() -> list[bytes]:
        p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", **tls.aiokafka_kwargs())
        await p.start()
        try:
            await p.send_and_wait(topic, b"aio", key=b"k", partition=0)
        finally:
            await p.stop()
        c = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", **tls.aiokafka_kwargs())
        await c.start()
        try:
            from aiokafka.structs import TopicPartition

            c.assign([TopicPartition(topic, 0)])
            out: list[bytes] = []
            while b"aio" not in out:
                batch = await asyncio.wait_for(c.getmany(timeout_ms=500), 30)
                out += [r.value for rs in batch.values() for r in rs]
            return out
        finally:
            await c.stop()

    assert b"aio" in asyncio.run(aio())

    # SASL PLAIN over TLS: the handshake runs inside the TLS session
    cert, key = pki["client"]
    sasl = KafkaSecurity(
        "SASL_SSL", "PLAIN", "hisam-worker", pki["password"], ca_file=pki["ca"], cert_file=cert, key_file=key
    )
    p = kafka.KafkaProducer(bootstrap_servers=broker.bootstrap, security=sasl)
    try:
        assert p.send(topic, b"sasl", partition=1).get(30).offset >= 0
        assert (p.config["security_protocol"], p.config["sasl_mechanism"]) == ("SASL_SSL", "PLAIN")
    finally:
        p.close()


def test_plaintext_and_untrusted_clients_fail(broker, tls, pki) -> None:
    from infra.kafka import KafkaError

    cert, key = pki["client"]
    wrong_ca = KafkaSecurity("SSL", ca_file=pki["other_ca"], cert_file=cert, key_file=key)
    no_client_cert = KafkaSecurity("SSL", ca_file=pki["ca"])
    for name, sec in (("plaintext", KafkaSecurity()), ("wrong CA", wrong_ca), ("no client cert", no_client_cert)):
        with pytest.raises(KafkaError):
            c = kafka.KafkaConsumer(bootstrap_servers=broker.bootstrap, security=sec, **SHORT)
            try:
                c.topics()
            finally:
                c.close()
            pytest.fail(f"a {name} client reached the TLS broker")
    # the control: the same call with the right setting works
    c = kafka.KafkaConsumer(bootstrap_servers=broker.bootstrap, security=tls, **SHORT)
    try:
        assert isinstance(c.topics(), set)
    finally:
        c.close()


def test_worker_appends_over_tls_and_trainer_reads_its_samples(broker, tls, tmp_path) -> None:
    from features.store import ItemSids
    from trainer.config import ServiceConfig
    from trainer.consumer import SampleConsumer

    project = f"t_kafka_tls_{RUN}"
    cfg = OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "repo", project=project, n_codes=N_CODES)
    store = open_stream_store(cfg)
    store.put_item_sids([ItemSids(BASE + i, tuple(i * 10 + j for j in range(N_CODES)), "v", 0) for i in range(3)])
    with ks.using(tls):
        tp.ensure_topics(broker.bootstrap, tp.default_topics(2))
    worker = WorkerProcess(
        [
            "--bootstrap", broker.bootstrap, "--backend", "sqlite", "--repo-dir", str(tmp_path / "repo"),
            "--project", project, "--n-codes", str(N_CODES), "--app-id", f"hisam-kafka-tls-{RUN}",
            "--instance-id", f"tls-{RUN}", "--within-ms", "5", *tls.args(),
        ],
        tmp_path / "worker.log",
    )  # fmt: skip
    assert "--kafka-tls-cert" in worker.args
    worker.start()
    with ks.using(tls):
        producer = prod.make_producer(broker.bootstrap, linger_ms=2)
    samples = None
    try:
        user = BASE + 7
        evs = [rec.action_event(f"{RUN}-ktls-{k}", user, BASE + k % 3, 1, 1_700_000_000_000 + k) for k in range(5)]
        prod.produce_actions(producer, evs)

        def stream() -> list[str]:
            (s,) = store.read_streams([user])
            return [] if s is None else s.event_ids

        want = [e.event_id for e in evs]
        wait_until(lambda: stream() == want, 120, 0.2, f"the worker's appends over TLS ({worker.log_path})")
        assert worker.alive(), worker.log_tail()

        # the trainer's consumer (kafka-python) reads the worker's training samples over TLS
        with ks.using(tls):
            samples = SampleConsumer(ServiceConfig(broker.bootstrap, tmp_path / "state", tmp_path / "models"))
            samples.connect({})
        got: list = []
        wait_until(lambda: got.extend(_records(samples)) or len(got) >= 5, 60, 0.1, "the training samples over TLS")
        assert samples._consumer.config["security_protocol"] == "SSL"
    finally:
        producer.close()
        worker.stop()
        store.close()
        if samples is not None:
            samples.close()


def _records(samples) -> list:
    return [r for rs in samples._consumer.poll(500).values() for r in rs]
