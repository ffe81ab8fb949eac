"""What Rank reads from the online store: the user's stream and the candidates' semantic IDs.

Reads go through ``features.store``'s direct store (``StreamStore.read_streams`` /
``read_item_sids``: the same bytes Feast reads, without Feast's protobuf-to-Python
conversion and without importing feast in the server; tests check parity with
``feast_read_streams``). The store is synchronous (redis-py, sqlite3), so each read runs in a
worker thread and the event loop keeps serving other requests; a SQLite store keeps one
connection per thread, as it requires.

Item-ID cache. Item semantic IDs change rarely (a new item, or a re-tokenized one), so they
are kept in an in-process dict: a miss (an item seen for the first time, or an entry older
than ``item_ttl_s``) is read from the store in one batched call; unknown items are not
cached, so an item becomes rankable as soon as the stream has ingested it. An item changed
at the source is therefore served with its new IDs at most ``item_ttl_s`` later. (Consuming
the item-events topic would make that immediate, at the price of a Kafka consumer per
server; the TTL keeps the server free of Kafka.) The cache is bounded: past ``max_items``
entries the oldest half is dropped.

Store failures (Redis down, SQLite locked or missing) raise ``StoreUnavailable`` with the
cause; the next request tries again (redis-py reconnects by itself), so the server recovers
when the store returns.

Metrics (infra/observability.py): each read's latency and failures (``read``: user_stream,
item_sids, ping), and the item-ID cache's hits and misses, one per candidate.

Conversions. The stream stores global token ids (``layer * K + code``, the tokenizer's
layout) and ``ActionType`` values; HMAT takes local codes in [0, K) and the binary action
label it was trained on (``features.actions.label_of``, the same rule the training samples use).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis

from features.actions import label_of
from features.store import ItemSids, StreamStore, UserStream
from infra import observability as obs

log = logging.getLogger(__name__)

ITEM_HITS = obs.CACHE_LOOKUPS.labels(cache="item", result="hit")
ITEM_MISSES = obs.CACHE_LOOKUPS.labels(cache="item", result="miss")

STORE_ERRORS = (redis.exceptions.RedisError, sqlite3.Error, OSError)


class StoreUnavailable(RuntimeError):
    """The online store could not be read."""


@dataclass(frozen=True)
class History:
    """A user's history as HMAT inputs: codes (T, k) in [0, K) and binary actions (T,), oldest first."""

    codes: np.ndarray
    actions: np.ndarray
    # (length, last event id): changes with every append, also once the stream is full
    # and the length stays at T. The anchor cache keys on it.
    version: tuple[int, str]

    def __len__(self) -> int:
        return len(self.actions)


def to_codes(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    """Global token ids (..., k) -> local codes; raises ValueError where a token is in no codebook of the model."""
    tokens = np.asarray(tokens, dtype=np.int64)
    codes = tokens - np.arange(tokens.shape[-1], dtype=np.int64) * codebook_size
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"tokens outside the model's codebooks of size {codebook_size}")
    return codes


def history_of(stream: UserStream | None, codebook_size: int) -> History:
    """A stored stream (None: no stream yet) as model inputs."""
    if stream is None or len(stream) == 0:
        return History(np.zeros((0, 0), np.int64), np.zeros(0, np.int64), (0, ""))
    codes = to_codes(stream.tokens, codebook_size)
    actions = np.fromiter((label_of(int(a)) for a in stream.actions), np.int64, len(stream.actions))
    return History(codes, actions, (len(stream), stream.event_ids[-1]))


class OnlineReader:
    """Async reads of user streams and item IDs, with the item-ID cache (module docstring)."""

    def __init__(self, store: StreamStore, *, item_ttl_s: float = 60.0, max_items: int = 1_000_000) -> None:
        self.store = store
        self.item_ttl_s = item_ttl_s
        self.max_items = max_items
        self._items: dict[int, tuple[float, ItemSids]] = {}

    async def _call(self, read: str, what: str, fn, *args):
        t0 = time.perf_counter()
        try:
            out = await asyncio.to_thread(fn, *args)
        except STORE_ERRORS as e:
            obs.STORE_ERRORS.labels(read).inc()
            raise StoreUnavailable(
                f"online store ({self.store.config.backend}) unavailable while reading {what}: {e}"
            ) from e
        obs.STORE_READ_LATENCY.labels(read).observe(time.perf_counter() - t0)
        return out

    async def user_stream(self, user_id: int) -> UserStream | None:
        return (await self._call("user_stream", f"the stream of user {user_id}", self.store.read_streams, [user_id]))[0]

    async def item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]:
        """Known items among ``item_ids`` (unknown ones are absent)."""
        now = time.monotonic()
        found: dict[int, ItemSids] = {}
        missing = []
        for i in item_ids:
            hit = self._items.get(i)
            if hit is not None and now - hit[0] < self.item_ttl_s:
                found[i] = hit[1]
            else:
                missing.append(i)
        ITEM_HITS.inc(len(found))
        ITEM_MISSES.inc(len(missing))
        if missing:
            read = await self._call("item_sids", f"{len(missing)} item(s)", self.store.read_item_sids, missing)
            if len(self._items) + len(read) > self.max_items:
                for k in list(self._items)[: len(self._items) // 2]:  # dicts keep insertion order: oldest first
                    del self._items[k]
            for i, sids in read.items():
                self._items[i] = (now, sids)
            found.update(read)
        return found

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers a read."""
        await self._call("ping", "a health probe", self.store.read_streams, [-1])
