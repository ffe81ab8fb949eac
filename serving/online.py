"""What Rank reads from the online store: the user's stream and the candidates' semantic IDs.

Reads go through ``features.store``'s direct store (``StreamStore.read_streams`` /
``read_item_sids``: the same bytes Feast reads, without Feast's protobuf-to-Python
conversion and without importing feast in the server; tests check parity with
``feast_read_streams``). The store is synchronous (redis-py, sqlite3), so each read runs in a
worker thread and the event loop keeps serving other requests; a SQLite store keeps one
connection per thread, as it requires.

Item-ID cache. Item semantic IDs change rarely (a new item, or a re-tokenized one), so they
are kept in an in-process dict: a miss (an item seen for the first time, or an entry older
than ``item_ttl_s``) is read from the store in one batched call. An item changed at the
source is therefore served with its new IDs at most ``item_ttl_s`` later. (Consuming the
item-events topic would make that immediate, at the price of a Kafka consumer per server;
the TTL keeps the server free of Kafka.) The cache is bounded: past ``max_items`` entries
the oldest are dropped down to half of it.

Unknown items are cached too, but only for ``unknown_ttl_s`` (2 s by default): a caller
that sends the same 1,000 ids the store does not know costs one 1,000-key read per
``unknown_ttl_s``, not one per call, on the Redis the stream workers write to; an item the
stream ingests is rankable at most ``unknown_ttl_s`` later. Bounded by ``max_unknown``
entries (the same way), so a caller sending ever new ids cannot grow
the server's memory.

Bounded reads. Every read runs in this reader's own pool of ``read_threads`` threads (a hung
store cannot take the event loop's default executor from anything else) and is abandoned
after ``read_timeout_s`` (2 s by default; a healthy read takes milliseconds), answering
``StoreUnavailable``; a health probe passes its own, shorter bound. The thread itself is
freed by the store client's socket timeout: ``store_config_for_reads`` gives redis-py a
``socket_timeout`` equal to the read bound (the store's client retries a dropped connection
once and a timed-out command never: features/store/redis.py).

A key of the wrong type in Redis (WRONGTYPE: a corrupt user, not an outage) is reported as
``OnlineStoreError`` naming what was read, like any other stored state the store cannot
decode: the server answers INTERNAL for that user and stays SERVING for the others.

Metrics (infra/observability.py): each read's latency and failures (``read``: user_stream,
item_sids, ping), and the item-ID cache's hits and misses, one per candidate.

Conversions. The stream stores global token ids (``layer * K + code``, the tokenizer's
layout) and ``ActionType`` values; HMAT takes local codes in [0, K) and the binary action
label it was trained on (``features.actions.label_of``, the same rule the training samples use).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import redis

from features.actions import label_of
from features.store import ItemSids, OnlineStoreConfig, StreamStore, UserStream
from features.store.base import OnlineStoreError
from infra import observability as obs

log = logging.getLogger(__name__)

ITEM_HITS = obs.CACHE_LOOKUPS.labels(cache="item", result="hit")
ITEM_MISSES = obs.CACHE_LOOKUPS.labels(cache="item", result="miss")

STORE_ERRORS = (redis.exceptions.RedisError, sqlite3.Error, OSError)

# Defaults (module docstring; `hisam serve --store-timeout / --unknown-ttl`).
READ_TIMEOUT_S = 2.0
UNKNOWN_TTL_S = 2.0
MAX_UNKNOWN = 100_000
READ_THREADS = 8


def store_config_for_reads(config: OnlineStoreConfig, timeout_s: float = READ_TIMEOUT_S) -> OnlineStoreConfig:
    """``config`` with redis-py's socket and connect timeouts set to ``timeout_s`` (a Redis URL's
    ``socket_timeout`` / ``socket_connect_timeout`` query arguments; ones already in the URL are kept).

    Without them a Redis that accepts connections but never answers holds a read's thread
    forever. SQLite configs are returned unchanged.
    """
    if config.backend != "redis" or not config.redis_url:
        return config
    parts = urlsplit(config.redis_url)
    query = dict(parse_qsl(parts.query))
    for name in ("socket_timeout", "socket_connect_timeout"):
        query.setdefault(name, f"{timeout_s:g}")
    return dataclasses.replace(config, redis_url=urlunsplit(parts._replace(query=urlencode(query))))


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
    """Async reads of user streams and item IDs, with the item-ID caches (module docstring)."""

    def __init__(
        self,
        store: StreamStore,
        *,
        item_ttl_s: float = 60.0,
        max_items: int = 1_000_000,
        unknown_ttl_s: float = UNKNOWN_TTL_S,
        max_unknown: int = MAX_UNKNOWN,
        read_timeout_s: float = READ_TIMEOUT_S,
        read_threads: int = READ_THREADS,
    ) -> None:
        if read_timeout_s <= 0 or read_threads < 1 or unknown_ttl_s < 0 or max_unknown < 1:
            raise ValueError(
                f"need read_timeout_s > 0, read_threads >= 1, unknown_ttl_s >= 0 and max_unknown >= 1, got "
                f"{read_timeout_s}, {read_threads}, {unknown_ttl_s}, {max_unknown}"
            )
        self.store = store
        self.item_ttl_s = item_ttl_s
        self.max_items = max_items
        self.unknown_ttl_s = unknown_ttl_s
        self.max_unknown = max_unknown
        self.read_timeout_s = read_timeout_s
        self._items: dict[int, tuple[float, ItemSids]] = {}
        self._unknown: dict[int, float] = {}  # item id -> when the store said it does not know it
        self._pool = ThreadPoolExecutor(read_threads, thread_name_prefix="store-read")

    async def _call(self, read: str, what: str, fn, *args, timeout_s: float | None = None):
        timeout_s = self.read_timeout_s if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._pool, fn, *args), timeout_s)
        except TimeoutError as e:  # the store accepts the call but does not answer (or a socket timeout)
            obs.STORE_ERRORS.labels(read).inc()
            raise StoreUnavailable(
                f"online store ({self.store.config.backend}) did not answer within {timeout_s:g}s while reading {what}"
            ) from e
        except redis.exceptions.ResponseError as e:
            if "WRONGTYPE" not in str(e):  # a pipeline prefixes "Command # n (...) of pipeline caused error"
                obs.STORE_ERRORS.labels(read).inc()
                raise StoreUnavailable(
                    f"online store ({self.store.config.backend}) refused a read of {what}: {e}"
                ) from e
            raise OnlineStoreError(f"{what} is stored under a key of another type: {e}") from e
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
        cached_unknown = 0
        for i in item_ids:
            hit = self._items.get(i)
            if hit is not None and now - hit[0] < self.item_ttl_s:
                found[i] = hit[1]
                continue
            since = self._unknown.get(i)
            if since is not None and now - since < self.unknown_ttl_s:
                cached_unknown += 1
            else:
                missing.append(i)
        ITEM_HITS.inc(len(found) + cached_unknown)
        ITEM_MISSES.inc(len(missing))
        if missing:
            read = await self._call("item_sids", f"{len(missing)} item(s)", self.store.read_item_sids, missing)
            for i, sids in read.items():
                self._items.pop(i, None)  # re-read: now the newest
                self._items[i] = (now, sids)
            _trim(self._items, self.max_items)
            for i in missing:
                self._unknown.pop(i, None)  # re-inserted at the end: insertion order stays oldest first
            if self.unknown_ttl_s > 0:
                for i in missing:
                    if i not in read:
                        self._unknown[i] = now
                _trim(self._unknown, self.max_unknown)
            found.update(read)
        return found

    async def ping(self, timeout_s: float | None = None) -> None:
        """Raise StoreUnavailable unless the store answers a read within ``timeout_s`` (None: the read bound)."""
        await self._call("ping", "a health probe", self.store.read_streams, [-1], timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the read threads (a read still running finishes in the background; the store stays open)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _trim(cache: dict, limit: int) -> None:
    """Past ``limit`` entries, drop the oldest down to half of it (dicts keep insertion order: oldest first)."""
    if len(cache) > limit:
        for k in list(cache)[: len(cache) - limit // 2]:
            del cache[k]
