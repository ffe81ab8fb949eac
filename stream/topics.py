"""The four topics and their creation (kafka-python admin).

user-actions is keyed by user id so one user's actions stay ordered in one partition;
item-events by item id. Topics are created explicitly (not auto-created on first use) so
that partition counts are a decision, not an accident; a topic may carry broker configs
(``TopicSpec.configs``, e.g. retention), set when it is created.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ITEM_EVENTS = "item-events"
USER_ACTIONS = "user-actions"
TRAINING_SAMPLES = "training-samples"
DEAD_LETTERS = "dead-letters"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int = 1
    # Topic-level broker configs (Kafka's names and string values), set at creation only.
    configs: Mapping[str, str] = field(default_factory=dict)


def retention_configs(retention_ms: int) -> dict[str, str]:
    """Configs that keep about the last ``retention_ms`` of a topic.

    A broker deletes only closed segments, so the segments roll at a fraction of the
    retention (a topic with Kafka's default 7-day segments would keep everything for a week
    whatever its retention).
    """
    if retention_ms <= 0:
        raise ValueError(f"retention_ms must be positive, got {retention_ms}")
    return {"retention.ms": str(retention_ms), "segment.ms": str(max(1, retention_ms // 4))}


def default_topics(partitions: int = 4, samples_retention_ms: int | None = None) -> list[TopicSpec]:
    """All hisam topics; ``partitions`` bounds how many stream workers can share the load.

    ``samples_retention_ms``: keep training-samples only that long (None: the broker's
    default retention). The samples are most of what the broker holds (the user's history
    travels with each one, about 4 KB at T=300).
    """
    samples = retention_configs(samples_retention_ms) if samples_retention_ms is not None else {}
    return [
        TopicSpec(ITEM_EVENTS, partitions),
        TopicSpec(USER_ACTIONS, partitions),
        TopicSpec(TRAINING_SAMPLES, partitions, configs=samples),
        TopicSpec(DEAD_LETTERS, partitions),
    ]


def ensure_topics(bootstrap: str, specs: Sequence[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""
    from infra.kafka import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="hisam-admin", request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        existing = set(admin.list_topics())
        todo = {
            s.name: {"num_partitions": s.partitions, "replication_factor": s.replication, "configs": dict(s.configs)}
            for s in specs
            if s.name not in existing
        }
        if todo:
            admin.create_topics(todo, timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
            log.info("created topics %s", sorted(todo))
        return sorted(todo)
    finally:
        admin.close()
