"""Online-store access for the stream and serving: the append Feast lacks, and direct reads.

Feast has no append, and a read-modify-write append through Feast loses updates when two
writers touch one user (docs/operations.md measured 40% lost); Feast's Redis writer also
skips a write whose event time is not newer than the stored one. So appends bypass Feast
and write Feast's own storage layout (``features.encoding``) atomically: in Redis by one
Lua script call per batch (``redis.py``), in SQLite by one ``BEGIN IMMEDIATE``
transaction per batch (``sqlite.py``).

Idempotency: every appended event id is remembered in a per-user *seen window* of the
last ``seen_window`` (W) appended ids, independent of T. An action whose id is in the window
is a duplicate: nothing is written and it produces no TrainingSample (its sample was
produced when it was first appended). The window must cover the longest redelivery of one
user's actions: at-least-once redelivers what was written but not yet committed, at most
the batches in flight plus the acked ones awaiting their offset commit, which the worker
keeps within W (``stream.app``); it requires W >= 2 x its batch size, and the default 1024
covers the default batches of 500. Memory is bounded: W ids of at most
``MAX_EVENT_ID_BYTES`` per user. A stream written through Feast (a push, or
``write_to_online_store``) has no window: its ids count as seen.

Hostile stored state: an append checks each user's stored state before it writes for that
user; a user whose state is not in this layout (a key of another type, a Value that does
not parse, a foreign window) gets its actions back ``refused=CORRUPT_USER_STATE`` with the
key and what is wrong, nothing written for it, and the batch's other users are appended.
``claim_layout`` guards the store's layout (n_codes, T) against a store configured
otherwise; the stream worker claims it at start.

The applied record: ``append_batch(..., applied=...)`` also raises, atomically with the
appends, the namespace's record of the highest source offset per (topic, partition) applied
(with that record's Kafka timestamp); ``applied_offsets`` reads it. A consumer group without
committed offsets resumes from it instead of replaying the topic (stream/resume.py).

User deletion (``deletion.py``): ``delete_users`` removes users' whole state from a namespace
atomically and exactly once, with a marker (``markers.py``) that makes the append drop their
actions for a grace period; ``OnlineStoreConfig.stream_ttl_s`` optionally expires a silent
user's state (``ttl.py``).

Reads for everything but the hot path go through Feast (``feast_read_streams``); serving
may use ``StreamStore.read_streams``, a direct read of the same bytes that skips Feast's
protobuf-to-Python conversion (``hisam bench stream`` measures both).

Thread model: a ``RedisStreamStore`` is thread-safe (a connection pool). A
``SqliteStreamStore`` keeps one connection per thread (SQLite connections are not
shareable); Feast's own SQLite store must likewise stay on one thread.

Importing this package stays light (no feast: ``open_feature_store`` imports it when called).
"""

from __future__ import annotations

from features.store.base import NamespaceStore, StreamStore
from features.store.config import OnlineStoreConfig, open_feature_store
from features.store.feast_reads import feast_read_item_sids, feast_read_streams
from features.store.records import AppliedOffset, ItemSids, SidClaim, StreamAction, UserState, UserStream
from features.store.redis import RedisStreamStore
from features.store.sqlite import SqliteStreamStore

__all__ = [
    "AppliedOffset",
    "ItemSids",
    "NamespaceStore",
    "OnlineStoreConfig",
    "SidClaim",
    "StreamAction",
    "StreamStore",
    "UserState",
    "UserStream",
    "feast_read_item_sids",
    "feast_read_streams",
    "open_feature_store",
    "open_stream_store",
]


def open_stream_store(config: OnlineStoreConfig) -> StreamStore:
    """The direct-access store for the configured backend (no feast import)."""
    if config.backend == "redis":
        return RedisStreamStore(config)
    return SqliteStreamStore(config)
