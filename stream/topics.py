"""The topics and their creation (kafka-python admin).

user-actions is keyed by user id so one user's actions stay ordered in one partition;
item-events by item id. Each consumer group of stream workers also has a retry topic of
its own (``action_retries``: actions whose item was not known yet, see
stream.processing.UnknownItemRetry), keyed by user id: private to the group, as the
store it writes to is, so that two groups (e.g. a re-tokenised namespace's) never take
each other's retries. Topics are created explicitly (not
auto-created on first use) so that partition counts are a decision, not an accident; a
topic may carry broker configs (``TopicSpec.configs``, e.g. retention), set when it is
created. In production every topic should be replicated (``replication`` 3) with
``min.insync.replicas`` 2, so that an acks=all write (every producer of the project)
survives the loss of a broker; the embedded broker has one node, hence the defaults 1
and unset.
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
# User deletion (stream/deletions.py): requests in, keyed by user id like user-actions; the
# workers' tombstones out, keyed by user id, read by Rank servers and the trainer.
USER_DELETIONS = "user-deletions"
USER_TOMBSTONES = "user-tombstones"


def action_retries(app_id: str) -> str:
    """The retry topic of the stream workers' consumer group ``app_id`` (module doc)."""
    return f"{app_id}-{USER_ACTIONS}-retry"


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


def default_topics(
    partitions: int = 4,
    samples_retention_ms: int | None = None,
    replication: int = 1,
    min_insync_replicas: int | None = None,
    app_id: str | None = None,
) -> list[TopicSpec]:
    """All hisam topics; ``partitions`` bounds how many stream workers can share the load.

    ``samples_retention_ms``: keep training-samples only that long (None: the broker's
    default retention). The samples are most of what the broker holds (the user's history
    travels with each one, about 4 KB at T=300). ``replication`` and
    ``min_insync_replicas`` (None: the broker's default) apply to every topic (module doc).
    ``app_id``: also the retry topic of that group of stream workers.
    """
    if replication < 1 or (min_insync_replicas is not None and not 1 <= min_insync_replicas <= replication):
        raise ValueError(f"need 1 <= min.insync.replicas <= replication, got {min_insync_replicas} and {replication}")
    common = {} if min_insync_replicas is None else {"min.insync.replicas": str(min_insync_replicas)}
    samples = retention_configs(samples_retention_ms) if samples_retention_ms is not None else {}
    names = [ITEM_EVENTS, USER_ACTIONS, TRAINING_SAMPLES, DEAD_LETTERS, USER_DELETIONS, USER_TOMBSTONES]
    if app_id is not None:
        names.append(action_retries(app_id))
    return [
        TopicSpec(name, partitions, replication, {**common, **(samples if name == TRAINING_SAMPLES else {})})
        for name in names
    ]


def ensure_topics(bootstrap: str, specs: Sequence[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. Every admin
    request is bounded by ``timeout_s`` (kafka-python raises KafkaTimeoutError after it)."""
    from infra.kafka import admin_client

    admin = admin_client(bootstrap, "hisam-admin", timeout_s)
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
