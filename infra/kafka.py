"""kafka-python for every synchronous Kafka client of the project, and small admin helpers.

kafka-python raises a DeprecationWarning when it is imported (docs/operations.md), which
matters wherever warnings are errors; it is imported here, once, with that warning silenced,
and every module takes its clients from here. The stream worker's own clients are faust's
(aiokafka) and do not come through this module.

``Offsets`` reads topics' end offsets and consumer groups' committed offsets (the run loop's
progress and lag); ``commit_offsets`` sets where a group resumes, ``commit_at_end`` makes it
start at a topic's current end (both from an unjoined consumer: a group with members refuses
such a commit, kafka-python's CommitFailedError). Every
client made here has an explicit request timeout (``REQUEST_TIMEOUT_S``), whatever the
installed kafka-python's default.

``KafkaConsumer``, ``KafkaProducer`` and ``KafkaAdminClient`` here are kafka-python's with the
process's Kafka security (``infra.kafka_security.active()``: TLS, SASL) added to every client
they make, unless a ``security=`` argument names another (docs/operations.md "Security:
Kafka").
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import kafka
    import kafka.admin
    from kafka import TopicPartition
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

from infra.kafka_security import KafkaSecurity, active

__all__ = [
    "REQUEST_TIMEOUT_S",
    "ConfigResource",
    "ConfigResourceType",
    "KafkaAdminClient",
    "KafkaConsumer",
    "KafkaError",
    "KafkaProducer",
    "OffsetAndMetadata",
    "Offsets",
    "TopicPartition",
    "admin_client",
    "commit_at_end",
    "commit_offsets",
]

# How long an admin or consumer request of the helpers below may take.
REQUEST_TIMEOUT_S = 30.0


def _secured(configs: dict, security: KafkaSecurity | None) -> dict:
    """``configs`` with the security settings added (explicit ``configs`` entries win)."""
    return {**(security or active()).kafka_python_kwargs(), **configs}


class KafkaConsumer(kafka.KafkaConsumer):
    """kafka-python's consumer with the process's (or ``security``'s) Kafka security."""

    def __init__(self, *topics: str, security: KafkaSecurity | None = None, **configs) -> None:
        super().__init__(*topics, **_secured(configs, security))


class KafkaProducer(kafka.KafkaProducer):
    """kafka-python's producer with the process's (or ``security``'s) Kafka security."""

    def __init__(self, security: KafkaSecurity | None = None, **configs) -> None:
        super().__init__(**_secured(configs, security))


class KafkaAdminClient(kafka.admin.KafkaAdminClient):
    """kafka-python's admin client with the process's (or ``security``'s) Kafka security."""

    def __init__(self, security: KafkaSecurity | None = None, **configs) -> None:
        super().__init__(**_secured(configs, security))


def admin_client(bootstrap: str, client_id: str, timeout_s: float = REQUEST_TIMEOUT_S) -> KafkaAdminClient:
    """An admin client whose requests (and its connection to the cluster) time out after ``timeout_s``."""
    ms = int(timeout_s * 1000)
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id, request_timeout_ms=ms)


def consumer(bootstrap: str, timeout_s: float = REQUEST_TIMEOUT_S, **kwargs) -> KafkaConsumer:
    """A KafkaConsumer whose requests time out after ``timeout_s``, without auto-commit."""
    kwargs.setdefault("enable_auto_commit", False)
    return KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **kwargs)


class Offsets:
    """End offsets of topics and committed offsets of groups, over one admin client and one consumer."""

    def __init__(self, bootstrap: str, client_id: str = "hisam-offsets") -> None:
        self.admin = admin_client(bootstrap, f"{client_id}-admin")
        self.consumer = consumer(bootstrap, client_id=client_id)

    def end(self, topic: str) -> dict[int, int]:
        parts = sorted(self.consumer.partitions_for_topic(topic) or ())
        got = self.consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in got.items()}

    def committed(self, group: str, topic: str) -> dict[int, int]:
        got = self.admin.list_group_offsets({group: None}).get(group, {})
        return {tp.partition: om.offset for tp, om in got.items() if tp.topic == topic and om.offset >= 0}

    def position(self, group: str, topic: str) -> tuple[int, int]:
        """(records committed, lag) of a consumer group on a topic, summed over partitions."""
        ends = self.end(topic)
        done = self.committed(group, topic)
        consumed = sum(done.get(p, 0) for p in ends)
        return consumed, sum(ends.values()) - consumed

    def close(self) -> None:
        self.consumer.close()
        self.admin.close()


def commit_offsets(
    bootstrap: str, group: str, topic: str, positions: dict[int, int], timeout_s: float = REQUEST_TIMEOUT_S
) -> None:
    """Commit ``group``'s offsets of ``topic`` (partition -> the next offset to read), from a
    consumer that assigns the partitions and never joins the group."""
    if not positions:
        return
    c = consumer(bootstrap, timeout_s, group_id=group)
    try:
        tps = {TopicPartition(topic, p): off for p, off in positions.items()}
        c.assign(list(tps))
        c.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in tps.items()})
    finally:
        c.close()


def commit_at_end(offsets: Offsets, bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Commit ``group``'s offsets at the topic's current end: it starts with what comes next."""
    ends = offsets.end(topic)
    commit_offsets(bootstrap, group, topic, ends)
    return ends
