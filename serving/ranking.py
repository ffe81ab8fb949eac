"""Rank: from (user, candidate item ids) to sorted scores (docs/method.md §4; docs/design.md "Rank").

Request assembly reuses the model's own functions: ``sequence.build_stream`` for the token
stream and export/graphs.py's ``stream_feed`` / ``ranking_feed`` / ``cache_from_outputs`` /
``cache_feed`` for the graph inputs, so serving cannot build a stream the model was not
trained on.

Two paths, both through the backend (Triton by default):

- anchor-cache path (default): the user's history is encoded once (``encode_history``), the
  compact cache is kept here, and each request scores its candidates against it
  (``score_with_cache``): the history is not recomputed while the user's stream is
  unchanged. The cache is an LRU bounded in bytes, keyed by user and stream version (length
  and last event id, ``online.History.version``), and each entry remembers the content
  version of the model that encoded it. A request whose stream changed misses (and its old
  entry is replaced); a response from another model version than the entry's (a version
  roll in Triton) drops every entry of the old version and re-encodes; if the version
  changes again between encode and score, that request falls back to the full path.
- full path: one ``ranking`` call on the whole stream with the candidates appended. Used
  when the cache is off (``cache_bytes=0``), as the fallback above, and for an empty
  history stream (no profile tokens, no actions), which has nothing to cache.

Both give the same scores up to fp32 rounding (tests/serving: 1e-5); for one model version
and one input the result is deterministic: candidates are put in item-id order before
the stream is built, so the request order cannot change a score, not even in the last bit.

Errors raised to the servicer: ``InvalidRequest`` (bad input, INVALID_ARGUMENT),
``Unavailable`` (backend or store down, UNAVAILABLE), ``DeadlineExceeded``, ``ModelError``
(the model returned NaN: an input the graphs flag as out of range; INTERNAL).

Deadlines. ``default_timeout_s`` is both the default and the cap: a request whose caller set
no deadline, or a longer one, gets ``default_timeout_s``, so a backend that hangs (a frozen
Triton, a black-holed network) cannot hold a request, its client, or one of the server's
concurrent-call slots (serving/server.py) for longer. All the work runs under that one
deadline, and each backend call is given the time left of it (Triton's ``client_timeout``),
not the whole budget again.

Metrics (infra/observability.py): anchor-cache hits and misses (one per scored request) and
the cache's size.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch

from export.graphs import cache_feed, cache_from_outputs, ranking_feed, stream_feed
from features.store import ItemSids
from infra import observability as obs
from models.hmat.sequence import StreamLayout, UserSequence, build_stream
from serving.backends import BackendDeadline, BackendError, BackendUnavailable
from serving.online import History, OnlineReader, StoreUnavailable, history_of, to_codes
from serving.profiles import Profiles
from serving.repository import GRAPH_MODELS, MODEL_FILE, published_versions

log = logging.getLogger(__name__)

ANCHOR_HITS = obs.CACHE_LOOKUPS.labels(cache="anchor", result="hit")
ANCHOR_MISSES = obs.CACHE_LOOKUPS.labels(cache="anchor", result="miss")


class InvalidRequest(ValueError):
    """The request itself is wrong (INVALID_ARGUMENT)."""


class Unavailable(RuntimeError):
    """A dependency (inference backend, online store) is down (UNAVAILABLE)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed (DEADLINE_EXCEEDED)."""


class ModelError(RuntimeError):
    """The model could not score valid-looking input (INTERNAL)."""


class ItemStatus(IntEnum):
    """Per-item outcome; the values are rank.proto's ItemStatus."""

    SCORED = 1
    UNKNOWN_ITEM = 2
    TOKENIZER_MISMATCH = 3


@dataclass(frozen=True)
class RankedItem:
    item_id: int
    score: float
    status: ItemStatus


@dataclass(frozen=True)
class RankResult:
    items: list[RankedItem]
    model_version: str
    history_len: int
    cache_hit: bool
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """What request assembly needs to know about the served model."""

    layout: StreamLayout
    rope: str
    codebook_size: int
    tokenizer_version: str  # "" when unknown: item versions are then not checked


def model_info(source: str | Path) -> ModelInfo:
    """The served model's layout from its ONNX metadata: a repository's newest version, or an export dir."""
    import onnx

    from models.hmat.model import HMATConfig

    src = Path(source)
    versions = published_versions(src)
    path = src / GRAPH_MODELS["ranking"] / str(max(versions)) / MODEL_FILE if versions else src / "ranking.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"no published HMAT model in {src} (looked for {path})")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    config = HMATConfig(**json.loads(meta["config"]))
    return ModelInfo(config.layout, config.rope, config.codebook_size, meta.get("tokenizer_version", ""))


@dataclass
class _CacheEntry:
    feed: dict[str, np.ndarray]  # score_with_cache inputs except "candidates"
    model_version: str
    nbytes: int


class AnchorCacheStore:
    """LRU of per-user anchor KV caches, bounded in bytes (module docstring)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, tuple[tuple[int, str], _CacheEntry]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, user_id: int, stream_version: tuple[int, str]) -> _CacheEntry | None:
        got = self._entries.get(user_id)
        if got is None or got[0] != stream_version:
            self.misses += 1
            ANCHOR_MISSES.inc()
            return None
        self._entries.move_to_end(user_id)
        self.hits += 1
        ANCHOR_HITS.inc()
        return got[1]

    def put(self, user_id: int, stream_version: tuple[int, str], entry: _CacheEntry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self.pop(user_id)
        self._entries[user_id] = (stream_version, entry)
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
        self._gauge()

    def pop(self, user_id: int) -> None:
        old = self._entries.pop(user_id, None)
        if old is not None:
            self.nbytes -= old[1].nbytes
            self._gauge()

    def _gauge(self) -> None:
        obs.ANCHOR_CACHE_BYTES.set(self.nbytes)
        obs.ANCHOR_CACHE_ENTRIES.set(len(self._entries))

    def drop_version(self, model_version: str) -> None:
        """Forget every entry encoded by ``model_version`` (a newer model is being served)."""
        for uid in [u for u, (_, e) in self._entries.items() if e.model_version == model_version]:
            self.pop(uid)

    def __len__(self) -> int:
        return len(self._entries)


def validate_request(user_id: int, item_ids: Sequence[int], max_candidates: int) -> None:
    if user_id < 0:
        raise InvalidRequest(f"user_id must be non-negative, got {user_id}")
    if not item_ids:
        raise InvalidRequest("no candidates: item_ids is empty")
    if len(item_ids) > max_candidates:
        raise InvalidRequest(f"{len(item_ids)} candidates, more than the limit of {max_candidates}")
    negative = [i for i in item_ids if i < 0]
    if negative:
        raise InvalidRequest(f"item ids must be non-negative, got {negative[:10]}")
    if len(set(item_ids)) != len(item_ids):
        seen, dups = set(), []
        for i in item_ids:
            if i in seen and i not in dups:
                dups.append(i)
            seen.add(i)
        raise InvalidRequest(f"duplicate item ids: {dups[:10]}")


def _left(deadline: float) -> float:
    """Seconds left until ``deadline`` (event-loop time), at least 1 ms (the enclosing timeout ends the call)."""
    return max(deadline - asyncio.get_running_loop().time(), 1e-3)


class Ranker:
    """Scores candidates for a user with the backend's model (module docstring)."""

    def __init__(
        self,
        backend,
        reader: OnlineReader,
        profiles: Profiles,
        model: ModelInfo,
        *,
        max_candidates: int = 1000,
        cache_bytes: int = 256 << 20,
        default_timeout_s: float = 30.0,
    ) -> None:
        self.backend = backend
        self.reader = reader
        self.profiles = profiles
        self.model = model
        self.max_candidates = max_candidates
        self.cache = AnchorCacheStore(cache_bytes) if cache_bytes > 0 else None
        self.default_timeout_s = default_timeout_s

    def forget_user(self, user_id: int) -> None:
        """Drop a deleted user's anchor cache entry (serving/deletions.py); on the serving event loop."""
        if self.cache is not None:
            self.cache.pop(user_id)
        obs.ANCHOR_CACHE_DELETIONS.inc()

    async def rank(self, user_id: int, item_ids: Sequence[int], timeout_s: float | None = None) -> RankResult:
        """Score ``item_ids`` for ``user_id`` within ``timeout_s``, capped at ``default_timeout_s`` (None: the cap)."""
        validate_request(user_id, item_ids, self.max_candidates)
        capped = timeout_s is None or timeout_s > self.default_timeout_s
        if capped:
            timeout_s = self.default_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await self._rank(user_id, list(item_ids), deadline)
        except (TimeoutError, BackendDeadline) as e:
            cap = " (the server's cap)" if capped else ""
            raise DeadlineExceeded(f"no scores within the deadline of {timeout_s:.3f}s{cap}") from e
        except (BackendUnavailable, StoreUnavailable) as e:
            raise Unavailable(str(e)) from e
        except BackendError as e:
            raise ModelError(str(e)) from e

    async def _rank(self, user_id: int, item_ids: list[int], deadline: float) -> RankResult:
        t0 = time.perf_counter()
        stream, sids = await asyncio.gather(self.reader.user_stream(user_id), self.reader.item_sids(item_ids))
        t_read = time.perf_counter()
        try:
            history = history_of(stream, self.model.codebook_size)
        except ValueError as e:
            raise ModelError(f"user {user_id}'s stream does not fit the model: {e}") from e
        scorable, status = self._candidates(item_ids, sids)
        scores: dict[int, float] = {}
        version, hit = "", False
        if scorable:
            ids = sorted(scorable)  # item-id order: the request order cannot change a score
            codes = np.stack([scorable[i] for i in ids])  # (N, k)
            profile = self.profiles.tokens(user_id)
            # An empty stream (a cold user of a model without profile tokens) has no anchors to
            # cache, and the encode graph takes no zero-token stream: it goes the full path.
            if self.cache is not None and (len(profile) or len(history)):
                got, version, hit = await self._score_cached(user_id, profile, history, codes, deadline)
            else:
                got = None
            if got is None:
                got, version = await self._score_full(profile, history, codes, deadline)
            if not np.isfinite(got).all():
                raise ModelError(f"the model returned no score for user {user_id} (input outside its tables)")
            scores = dict(zip(ids, got.tolist(), strict=True))
        t_model = time.perf_counter()
        ranked = sorted(scores, key=lambda i: (-scores[i], i))
        items = [RankedItem(i, scores[i], ItemStatus.SCORED) for i in ranked]
        items += [RankedItem(i, 0.0, status[i]) for i in item_ids if i in status]
        timings = {"read": (t_read - t0) * 1e3, "model": (t_model - t_read) * 1e3}
        return RankResult(items, version, len(history), hit, timings)

    def _candidates(
        self, item_ids: list[int], sids: dict[int, ItemSids]
    ) -> tuple[dict[int, np.ndarray], dict[int, ItemStatus]]:
        """(item -> codes (k,) of the scorable items, item -> status of the others)."""
        want = self.model.tokenizer_version
        scorable, status = {}, {}
        for i in item_ids:
            s = sids.get(i)
            if s is None:
                status[i] = ItemStatus.UNKNOWN_ITEM
                continue
            if want and s.tokenizer_version and s.tokenizer_version != want:
                status[i] = ItemStatus.TOKENIZER_MISMATCH
                continue
            try:
                codes = to_codes(np.asarray(s.tokens), self.model.codebook_size)
            except ValueError:
                status[i] = ItemStatus.TOKENIZER_MISMATCH
                continue
            if codes.shape != (self.model.layout.n_sid,):
                status[i] = ItemStatus.TOKENIZER_MISMATCH
                continue
            scorable[i] = codes
        return scorable, status

    def _user(self, profile: Sequence[int], history: History, candidates: np.ndarray | None = None) -> UserSequence:
        k = self.model.layout.n_sid
        sids = history.codes if len(history) else np.zeros((0, k), np.int64)
        return UserSequence(
            profile=list(profile),
            sids=torch.from_numpy(sids),
            actions=torch.from_numpy(history.actions),
            candidates=torch.from_numpy(candidates) if candidates is not None else (),
        )

    async def _score_full(
        self, profile: Sequence[int], history: History, codes: np.ndarray, deadline: float
    ) -> tuple[np.ndarray, str]:
        stream = build_stream([self._user(profile, history, codes)], self.model.layout)
        scores, version = await self.backend.rank(ranking_feed(stream, self.model.rope), _left(deadline))
        return scores[0], version

    async def _score_cached(
        self, user_id: int, profile: Sequence[int], history: History, codes: np.ndarray, deadline: float
    ) -> tuple[np.ndarray | None, str, bool]:
        """(scores or None to fall back to the full path, model version, cache hit)."""
        candidates = codes[None]  # (1, N, k)
        entry = self.cache.get(user_id, history.version)
        if entry is not None:
            scores, version = await self.backend.score_with_cache(
                {**entry.feed, "candidates": candidates}, _left(deadline)
            )
            if version == entry.model_version:
                return scores[0], version, True
            log.info("model version changed from %s to %s: dropping its anchor caches", entry.model_version, version)
            self.cache.drop_version(entry.model_version)
        stream = build_stream([self._user(profile, history)], self.model.layout)
        outputs, encoded_by = await self.backend.encode_history(stream_feed(stream, self.model.rope), _left(deadline))
        feed = cache_feed(cache_from_outputs(outputs), torch.from_numpy(candidates))
        del feed["candidates"]
        scores, version = await self.backend.score_with_cache({**feed, "candidates": candidates}, _left(deadline))
        if version != encoded_by:  # a roll between the two calls: the cache is not this model's
            return None, version, False
        self.cache.put(user_id, history.version, _CacheEntry(feed, version, sum(v.nbytes for v in feed.values())))
        return scores[0], version, False
