"""kafka-python for every synchronous Kafka client of the project, and small admin helpers.

kafka-python raises a DeprecationWarning when it is imported (docs/operations.md), which
matters wherever warnings are errors; it is imported here, once, with that warning silenced,
and every module takes its clients from here. The stream worker's own clients are faust's
(aiokafka) and do not come through this module.

``Offsets`` reads topics' end offsets and consumer groups' committed offsets (the run loop's
progress and lag); ``commit_at_end`` makes a group start at a topic's current end.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
    from kafka.structs import OffsetAndMetadata

__all__ = [
    "ConfigResource",
    "ConfigResourceType",
    "KafkaAdminClient",
    "KafkaConsumer",
    "KafkaProducer",
    "OffsetAndMetadata",
    "Offsets",
    "TopicPartition",
    "commit_at_end",
]


class Offsets:
    """End offsets of topics and committed offsets of groups, over one admin client and one consumer."""

    def __init__(self, bootstrap: str, client_id: str = "hisam-offsets") -> None:
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=f"{client_id}-admin")
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id=client_id, enable_auto_commit=False)

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


def commit_at_end(offsets: Offsets, bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Commit ``group``'s offsets at the topic's current end: it starts with what comes next."""
    ends = offsets.end(topic)
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = {TopicPartition(topic, p): off for p, off in ends.items()}
        c.assign(list(tps))
        c.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in tps.items()})
    finally:
        c.close()
    return ends
