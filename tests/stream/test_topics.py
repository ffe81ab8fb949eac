"""Topic creation on the real broker: partitions and topic configs as asked, existing topics left alone."""

from __future__ import annotations

import uuid

import pytest

from stream import topics as tp

pytestmark = pytest.mark.kafka


def _describe(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    from infra.kafka import ConfigResource, ConfigResourceType, KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
        partitions = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)}
    finally:
        admin.close()
    out = {n: {k: v["value"] for k, v in got["topic"][n].items()} for n in names}
    for n in names:
        out[n]["partitions"] = str(partitions[n])
    return out


def test_topics_are_created_with_their_configs_and_existing_ones_kept(kafka_bootstrap) -> None:
    run = uuid.uuid4().hex[:8]
    bounded, plain = f"samples-{run}", f"actions-{run}"
    specs = [tp.TopicSpec(bounded, 3, configs=tp.retention_configs(60_000)), tp.TopicSpec(plain, 2)]
    assert tp.ensure_topics(kafka_bootstrap, specs) == sorted([bounded, plain])
    got = _describe(kafka_bootstrap, [bounded, plain])
    assert got[bounded]["retention.ms"] == "60000"
    assert got[bounded]["segment.ms"] == "15000"  # segments roll, so the retention can act
    assert got[bounded]["partitions"] == "3"
    assert "retention.ms" not in got[plain] and got[plain]["partitions"] == "2"

    # A topic that exists is neither recreated nor reconfigured.
    again = [tp.TopicSpec(bounded, 3, configs=tp.retention_configs(5_000))]
    assert tp.ensure_topics(kafka_bootstrap, again) == []
    assert _describe(kafka_bootstrap, [bounded])[bounded]["retention.ms"] == "60000"


def test_default_topics_bound_only_the_samples_when_asked() -> None:
    by_name = {s.name: s for s in tp.default_topics(4, samples_retention_ms=30_000)}
    assert by_name[tp.TRAINING_SAMPLES].configs == {"retention.ms": "30000", "segment.ms": "7500"}
    assert all(not s.configs for n, s in by_name.items() if n != tp.TRAINING_SAMPLES)
    assert all(not s.configs for s in tp.default_topics(4))
    with pytest.raises(ValueError, match="positive"):
        tp.retention_configs(0)


def test_the_broker_reports_its_process() -> None:
    from hisam.bench.stream.common import cpu_seconds
    from infra.services import kafka_broker

    with kafka_broker() as broker:
        assert broker.pid is not None
        with open(f"/proc/{broker.pid}/cmdline", "rb") as f:
            assert b"noida-db" in f.read()
        assert tp.ensure_topics(broker.bootstrap, [tp.TopicSpec("t", 1)]) == ["t"]
        assert cpu_seconds(broker.pid) is not None
    assert cpu_seconds(None) is None and cpu_seconds(1 << 23) is None  # above any pid_max


def test_default_topics_carry_replication_min_insync_and_the_groups_retry_topic() -> None:
    specs = tp.default_topics(4, samples_retention_ms=30_000, replication=3, min_insync_replicas=2, app_id="g1")
    by_name = {s.name: s for s in specs}
    assert set(by_name) == {
        tp.ITEM_EVENTS,
        tp.USER_ACTIONS,
        tp.TRAINING_SAMPLES,
        tp.DEAD_LETTERS,
        tp.USER_DELETIONS,
        tp.USER_TOMBSTONES,
        tp.action_retries("g1"),
    }
    assert tp.action_retries("g1") == "g1-user-actions-retry" != tp.action_retries("g2")
    assert all(s.replication == 3 and s.configs["min.insync.replicas"] == "2" for s in specs)
    assert by_name[tp.TRAINING_SAMPLES].configs["retention.ms"] == "30000"
    assert "retention.ms" not in by_name[tp.USER_ACTIONS].configs
    for replication, insync in [(0, None), (2, 3), (2, 0)]:
        with pytest.raises(ValueError, match="min.insync.replicas"):
            tp.default_topics(4, replication=replication, min_insync_replicas=insync)


def test_min_insync_replicas_is_set_on_the_created_topics(kafka_bootstrap) -> None:
    run = uuid.uuid4().hex[:8]
    specs = [s for s in tp.default_topics(2, min_insync_replicas=1, app_id=f"g-{run}") if run in s.name]
    assert [s.name for s in specs] == [tp.action_retries(f"g-{run}")]
    assert tp.ensure_topics(kafka_bootstrap, specs, timeout_s=10) == [specs[0].name]
    assert _describe(kafka_bootstrap, [specs[0].name])[specs[0].name]["min.insync.replicas"] == "1"
