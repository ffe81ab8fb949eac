"""The four topics and their creation (kafka-python admin).

user-actions is keyed by user id so one user's actions stay ordered in one partition;
item-events by item id. Topics are created explicitly (not auto-created on first use) so
that partition counts are a decision, not an accident.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

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


def default_topics(partitions: int = 4) -> list[TopicSpec]:
    """All hisam topics; ``partitions`` bounds how many stream workers can share the load."""
    return [TopicSpec(t, partitions) for t in (ITEM_EVENTS, USER_ACTIONS, TRAINING_SAMPLES, DEAD_LETTERS)]


def ensure_topics(bootstrap: str, specs: Sequence[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python warns on import
        from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="hisam-admin", request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        existing = set(admin.list_topics())
        todo = {
            s.name: {"num_partitions": s.partitions, "replication_factor": s.replication}
            for s in specs
            if s.name not in existing
        }
        if todo:
            admin.create_topics(todo, timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
            log.info("created topics %s", sorted(todo))
        return sorted(todo)
    finally:
        admin.close()
