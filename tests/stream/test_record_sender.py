"""RecordSender through the worker's own faust producer, on the real broker: one record batch
per partition for a batch of samples, each record on its key's partition, none lost."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from features.store import OnlineStoreConfig
from stream import topics as tp
from stream.app import RecordSender, StreamSettings, create_app

pytestmark = pytest.mark.kafka

SAMPLE_BYTES = 3_900  # about a TrainingSample with a T=300 history


def _read_all(bootstrap: str, topic: str, n: int) -> list:
    from infra.kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    got: list = []
    try:
        for _ in range(100):
            for records in consumer.poll(timeout_ms=200).values():
                got += records
            if len(got) >= n:
                break
    finally:
        consumer.close()
    return got


@pytest.mark.parametrize("batch_bytes", [16_384, 512 * 1024])
def test_a_batch_of_samples_goes_as_few_record_batches_each_on_its_keys_partition(
    kafka_bootstrap, tmp_path, batch_bytes
) -> None:
    topic = f"samples-{uuid.uuid4().hex[:8]}"
    tp.ensure_topics(kafka_bootstrap, [tp.TopicSpec(topic, 4)])
    settings = StreamSettings(
        bootstrap=kafka_bootstrap,
        store=OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "repo"),
        app_id=f"sender-{uuid.uuid4().hex[:8]}",
        producer_batch_bytes=batch_bytes,
    )
    records = [(str(u % 97).encode(), u.to_bytes(4, "big") * (SAMPLE_BYTES // 4)) for u in range(300)]

    async def send() -> tuple[int, dict[bytes, int]]:
        app = create_app(settings)
        assert app.conf.producer_max_batch_size == batch_bytes
        await app.producer.start()
        try:
            futs = await RecordSender(app.producer._ensure_producer).send(topic, records)
            await asyncio.gather(*futs)
            want = {key: app.producer.key_partition(topic, key).partition for key, _ in records}
        finally:
            await app.producer.stop()
        return len(futs), want

    n_batches, partition_of = asyncio.run(send())
    per_partition = Counter()
    for key, value in records:
        per_partition[partition_of[key]] += len(key) + len(value)
    assert len(per_partition) == 4
    if batch_bytes == 16_384:  # faust's default: 4 samples a record batch
        assert n_batches >= sum(per_partition.values()) // batch_bytes
    else:  # every partition's share fits one record batch
        assert max(per_partition.values()) < 0.9 * batch_bytes
        assert n_batches == 4

    got = _read_all(kafka_bootstrap, topic, len(records))
    assert len(got) == len(records)
    assert Counter(r.value for r in got) == Counter(v for _, v in records)  # each exactly once
    assert all(r.partition == partition_of[r.key] for r in got)  # where a keyed send puts it
    # Per key, in send order.
    by_key: dict[bytes, list[bytes]] = {}
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(r.key, []).append(r.value)
    for key, values in by_key.items():
        assert values == [v for k, v in records if k == key]
