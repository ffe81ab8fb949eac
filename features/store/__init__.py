"""Online-store access for the stream and serving: the append Feast lacks, and direct reads.

Feast has no append, and a read-modify-write append through Feast loses updates when two
writers touch one user (docs/operations.md measured 40% lost); Feast's Redis writer also
skips a write whose event time is not newer than the stored one. So appends bypass Feast
and write Feast's own storage layout (``features.encoding``) atomically:

* Redis: one Lua script per append (EVALSHA, one round trip, atomic on the server). It
  reads the user's hash, checks the event id against a window of seen ids, appends the
  item's tokens / action / event id / time to the packed protobuf lists, drops the oldest
  items beyond T, bumps the profile counters and writes everything back. A batch is one
  script call over all its actions (Redis Cluster: one call per action, pipelined): one
  round trip per batch.
* SQLite: one ``BEGIN IMMEDIATE`` transaction per append or per batch, against Feast's
  table layout; SQLite's write lock serialises concurrent writers.

Idempotency: every appended event id is remembered in a per-user *seen window* of the
last ``seen_window`` (W) appended ids, independent of T. An action whose id is in the window
is a duplicate: nothing is written and it produces no TrainingSample (its sample was
produced when it was first appended). The window must cover the longest redelivery of one
user's actions: at-least-once redelivers what was written but not yet committed, at most
the batches in flight plus the acked ones awaiting their offset commit, which the worker
keeps within W (``stream.app``); it requires W >= 2 x its batch size, and the default 1024
covers the default batches of 500. Memory is bounded: W ids of at most ``MAX_EVENT_ID_BYTES`` per user.

* Redis: the window is kept in the user's own hash, in B = ceil(W / 32) bucket fields
  (``_hisam:user_stream:seen:<b>``, B in ``..:seen_b``): an id goes to bucket
  ``int(sha1(id)[:8], 16) % B`` as ``NUL id 0xFF seq``, in append order, where seq is the
  user's append count then; it is remembered while seq > count - W, and a bucket drops its
  forgotten ids whenever it is written. So an append reads and rewrites about 32 ids, not
  W (the window as one field of W ids cost more of the script's time than the stream
  itself; an earlier layout's window is moved into buckets on the user's first append,
  and so is one of another bucket count, after a change of W). In the user's hash the
  window is written by the same script call, lives in the same Redis Cluster slot whatever
  the key's bytes (Feast's binary keys can contain ``{``/``}``, so no hash tag could follow
  a separate key reliably), and is deleted with the entity by Feast's
  ``delete_entity_values``; Feast reads only the fields it asks for.
* SQLite: a side table ``{project}_hisam_seen`` (one row per remembered id, with the
  per-user sequence number that orders eviction), written in the append's transaction.

Reads for everything but the hot path go through Feast (``feast_read_streams``); serving
may use ``StreamStore.read_streams``, a direct read of the same bytes that skips Feast's
protobuf-to-Python conversion (``hisam bench stream`` measures both).

Thread model: a ``RedisStreamStore`` is thread-safe (a connection pool). A
``SqliteStreamStore`` keeps one connection per thread (SQLite connections are not
shareable); Feast's own SQLite store must likewise stay on one thread.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import urlparse

import numpy as np

from features import encoding as enc

if TYPE_CHECKING:  # feast is imported only by the functions that need it
    from feast import FeatureStore

log = logging.getLogger(__name__)

# Longest event id accepted: bounds the seen window's memory (W ids per user).
MAX_EVENT_ID_BYTES = 256

# Redis: ids per bucket of the seen window, on average (an append rewrites one bucket).
SEEN_BUCKET_IDS = 32

Backend = Literal["sqlite", "redis"]


class OnlineStoreError(RuntimeError):
    """The online store rejected a write or holds data in an unexpected layout."""


@dataclass(frozen=True)
class OnlineStoreConfig:
    """Where the online store lives and the stream contract it keeps.

    ``repo_dir`` receives the generated feature_store.yaml and Feast's registry; the SQLite
    database defaults to ``repo_dir/online.db``.
    """

    backend: Backend = "sqlite"
    repo_dir: Path = Path("artifacts/feature_repo")
    redis_url: str | None = None
    sqlite_path: Path | None = None
    project: str = enc.DEFAULT_PROJECT
    stream_len: int = 300  # T: items kept per user (the paper's 300)
    n_codes: int = 6  # semantic-ID tokens per item
    # W: appended event ids remembered per user for idempotency (see the module doc);
    # at least 2 x the stream worker's batch size.
    seen_window: int = 1024
    # Redis Cluster: batch appends become one script call per action (keys of one call
    # must share a hash slot). Reads and the layout are the same.
    redis_cluster: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("sqlite", "redis"):
            raise ValueError(f"backend must be 'sqlite' or 'redis', got {self.backend!r}")
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend 'redis' needs redis_url (redis://host:port/db)")
        if self.stream_len < 1 or self.n_codes < 1 or self.seen_window < 1:
            raise ValueError(
                f"stream_len, n_codes and seen_window must be >= 1, got {self.stream_len}, {self.n_codes}, {self.seen_window}"
            )
        if not self.project.isidentifier():
            raise ValueError(f"project must be an identifier (it names tables), got {self.project!r}")

    @property
    def seen_buckets(self) -> int:
        """Redis: the seen window's buckets (about ``SEEN_BUCKET_IDS`` ids each; module doc)."""
        return -(-self.seen_window // SEEN_BUCKET_IDS)

    @property
    def sqlite_db(self) -> Path:
        return Path(self.sqlite_path) if self.sqlite_path else Path(self.repo_dir) / "online.db"

    def feast_online_store(self) -> dict:
        """The ``online_store`` block of feature_store.yaml."""
        if self.backend == "sqlite":
            return {"type": "sqlite", "path": str(self.sqlite_db.resolve())}
        u = urlparse(self.redis_url)
        db = (u.path or "/0").lstrip("/") or "0"
        conn = f"{u.hostname or '127.0.0.1'}:{u.port or 6379},db={db}"
        if u.password:
            conn += f",password={u.password}"
        return {"type": "redis", "connection_string": conn}


def write_feature_store_yaml(config: OnlineStoreConfig) -> Path:
    """Write ``repo_dir/feature_store.yaml`` for the configured backend; returns its path.

    Written from code (not committed) because the paths and the Redis address are only
    known at run time.
    """
    import json

    repo = Path(config.repo_dir).resolve()
    repo.mkdir(parents=True, exist_ok=True)
    doc = {
        "project": config.project,
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(repo / "registry.db"), "cache_ttl_seconds": 0},
        "online_store": config.feast_online_store(),
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": enc.ENTITY_KEY_SERIALIZATION_VERSION,
    }
    path = repo / "feature_store.yaml"
    # JSON is a subset of YAML: no yaml dependency, and no quoting surprises in paths.
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def open_feature_store(config: OnlineStoreConfig, apply: bool = True) -> FeatureStore:
    """A Feast ``FeatureStore`` over the configured backend, with the definitions applied.

    Imports feast (~5 s): call it from jobs and tests, never from a light import chain.
    """
    import warnings

    from feast import FeatureStore

    from features import definitions

    write_feature_store_yaml(config)
    store = FeatureStore(repo_path=str(Path(config.repo_dir).resolve()))
    if apply:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.apply(definitions.ALL_OBJECTS)
    return store


# ---- records -------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamAction:
    """One action to append: the item's semantic IDs travel with it (looked up upstream)."""

    user_id: int
    event_id: str
    item_id: int
    action: int
    event_time_ms: int
    item_tokens: tuple[int, ...]

    def validate(self, n_codes: int) -> None:
        if not self.event_id or "\x00" in self.event_id:
            raise ValueError(f"event_id must be a non-empty string without NUL, got {self.event_id!r}")
        if len(self.event_id.encode("utf-8")) > MAX_EVENT_ID_BYTES:
            raise ValueError(f"event_id is longer than {MAX_EVENT_ID_BYTES} bytes: {self.event_id[:40]!r}...")
        if len(self.item_tokens) != n_codes:
            raise ValueError(f"item {self.item_id} has {len(self.item_tokens)} tokens, the store keeps {n_codes}")
        if self.action < 0 or self.event_time_ms < 0 or min(self.item_tokens) < 0:
            raise ValueError(f"action, event time and tokens must be non-negative (event {self.event_id})")


@dataclass(frozen=True)
class AppendResult:
    """Outcome of one append.

    ``appended`` is False for a duplicate (an event id in the seen window): nothing was
    written. For an appended action, the history is the user's stream before it, oldest
    first, kept as protobuf packed varints (what both stores hold, and what a
    TrainingSample's repeated fields are on the wire): ``history_tokens`` (P, n_codes) and
    ``history_actions`` (P,) decode them. An append with ``want_history=False`` has an
    empty history.

    ``resampled``: a duplicate whose action the stream still holds comes back with the
    history before it (as the stream holds it now: the original history less any older
    items trimmed since), so the caller can produce its TrainingSample again: a crash
    after the store write and before the sample was sent then loses no sample (samples
    carry the event id; the trainer drops repeats). A duplicate older than the stream has
    ``resampled`` False and an empty history: no sample can be rebuilt for it.
    """

    appended: bool
    history_tokens_packed: bytes
    history_actions_packed: bytes
    n_codes: int
    resampled: bool = False

    @property
    def duplicate(self) -> bool:
        return not self.appended

    @property
    def history_tokens(self) -> np.ndarray:
        return _unpack(self.history_tokens_packed).reshape(-1, self.n_codes)  # (P, n_codes)

    @property
    def history_actions(self) -> np.ndarray:
        return _unpack(self.history_actions_packed)


@dataclass(frozen=True)
class UserStream:
    """A user's stored stream, oldest first: tokens (L, n_codes), actions (L,), times (L,)."""

    user_id: int
    tokens: np.ndarray
    actions: np.ndarray
    event_ids: list[str]
    event_times_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.event_ids)


@dataclass(frozen=True)
class ItemSids:
    """An item's semantic IDs from a tokenizer version."""

    item_id: int
    tokens: tuple[int, ...]
    tokenizer_version: str
    event_time_ms: int


@dataclass(frozen=True)
class SidClaim:
    """An item's candidate semantic IDs, best first: ``prefix`` then each of ``last_tokens``.

    The item ingestion's collision rule (docs/method.md: two items never share one full ID):
    the first candidate is the tokenizer's natural ID; the others move only the last,
    finest token, by the last codebook's distances.
    """

    item_id: int
    prefix: tuple[int, ...]  # the first L-1 tokens
    last_tokens: tuple[int, ...]  # candidates for the last token, best first

    def candidate(self, k: int) -> tuple[int, ...]:
        return (*self.prefix, self.last_tokens[k])


class StreamStore(Protocol):
    """What the stream and serving need from the online store."""

    config: OnlineStoreConfig

    def append(self, action: StreamAction, want_history: bool = True) -> AppendResult: ...

    def append_batch(self, actions: Sequence[StreamAction], want_history: bool = True) -> list[AppendResult]: ...

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]: ...

    def put_item_sids(self, items: Sequence[ItemSids]) -> None: ...

    def claim_item_sids(self, claims: Sequence[SidClaim]) -> list[tuple[int, ...] | None]: ...

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]: ...

    def close(self) -> None: ...


def open_stream_store(config: OnlineStoreConfig) -> StreamStore:
    """The direct-access store for the configured backend (no feast import)."""
    if config.backend == "redis":
        return RedisStreamStore(config)
    return SqliteStreamStore(config)


def _ints(value: enc.OnlineValue) -> np.ndarray:
    return np.asarray(value.int64_list_val.val, dtype=np.int64)


def _unpack(packed: bytes) -> np.ndarray:
    """Packed protobuf varints (a repeated int64 field's payload) -> int64 array."""
    return np.asarray(enc.unpack_varints(packed), np.int64)


def _user_stream(user_id: int, raw: Sequence[bytes | None], n_codes: int) -> UserStream | None:
    if raw[2] is None:  # no event_ids field: the user has no stream yet
        return None
    tok, act, eids, times = (enc.decode_value(r) for r in raw)
    return UserStream(
        user_id=int(user_id),
        tokens=_ints(tok).reshape(-1, n_codes),
        actions=_ints(act),
        event_ids=list(eids.string_list_val.val),
        event_times_ms=_ints(times),
    )


# ---- Redis ---------------------------------------------------------------------------


_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_CACHE_MAX = 1 << 16  # entries of RedisStreamStore's encode/decode caches (cleared when full)


_varint = enc.varint


def _read_varint(b: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        c = b[pos]
        out |= (c & 0x7F) << shift
        pos += 1
        if c < 0x80:
            return out, pos
        shift += 7


def _ints_payload(value: bytes) -> bytes:
    """The packed varints of an int64 list Value (empty bytes: none)."""
    if not value:
        return b""
    if value[0] != 114:
        raise OnlineStoreError("a user stream field is not an int64 list Value")
    size, pos = _read_varint(value, 1)
    if size == 0:
        return b""
    n, pos = _read_varint(value, pos + 1)  # past the packed field's tag
    if pos + n > len(value):
        raise OnlineStoreError("a user stream field's int64 list Value is truncated")
    return value[pos : pos + n]


def _lua_bytes(b: bytes) -> str:
    """A Lua string literal holding arbitrary bytes (decimal escapes)."""
    return '"' + "".join(f"\\{c}" for c in b) + '"'


# Shared by the scripts below: protobuf varints, and the u32-length-prefixed fields of
# their one argument blob (ARGV[1]), read in order by ``field()``.
_LUA_PRELUDE = r"""
local blob, pos = ARGV[1], 1

local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end

local function field()
  local n
  n, pos = struct.unpack('<I4', blob, pos)
  local v = string.sub(blob, pos, pos + n - 1)
  pos = pos + n
  return v
end
"""


_APPEND_LUA = r"""
-- Atomic, idempotent, bounded append of actions to users' streams in Feast's Redis
-- layout (see features/encoding.py). KEYS[i]: the i-th action's user hash key.
-- ARGV[1], per action: u32-length-prefixed event_id, token varints, action varint,
-- time varint, time ms (decimal), Timestamp proto bytes; then a u8 want_history.
-- Reply: an array. First, one status byte per action (1 appended, 0 duplicate, 2
-- duplicate still in the stream); then, per action, the user's stored token and action
-- Values before it (the history, in their int64 list wrappers; empty when not wanted, and
-- for a duplicate the stream no longer holds). Idempotency: the last W appended event ids
-- of the user, in B buckets (see rebucket).
--
-- Cost: Redis' Lua hashes every byte of every string it creates (about 1 ns a byte here),
-- so the script creates only what it must: each stream field once read and once written,
-- one bucket of about W / B ids (never the whole window), and no reply blob (concatenating
-- the histories cost Redis a third of its time; an array of the strings read costs nothing).
local NC = __NC__
local T = __T__
local W = __W__
local B = __B__
local B_STR = tostring(B)
local F_TOK, F_ACT, F_EID, F_TIM = __F_TOK__, __F_ACT__, __F_EID__, __F_TIM__
local F_TS, P_TS, P_N, P_LAST = __F_TS__, __P_TS__, __P_N__, __P_LAST__
local M_LEN, M_MAX, M_TOTAL = __M_LEN__, __M_MAX__, __M_TOTAL__
local M_SEEN_B, SEEN_PREFIX = __M_SEEN_B__, __SEEN_PREFIX__
-- the window's layout before buckets (one field of NUL-delimited ids, and its count)
local M_SEEN, M_SEEN_N = __M_SEEN__, __M_SEEN_N__

local function read_varint(s, pos)
  local result, mult = 0, 1
  while true do
    local b = string.byte(s, pos)
    if b == nil then error('truncated varint') end
    result = result + (b % 128) * mult
    pos = pos + 1
    if b < 128 then return result, pos end
    mult = mult * 128
  end
end

local function skip_varints(s, pos, k)
  for _ = 1, k do
    while string.byte(s, pos) >= 128 do pos = pos + 1 end
    pos = pos + 1
  end
  return pos
end

local function skip_strings(s, pos, k)
  for _ = 1, k do
    local len
    len, pos = read_varint(s, pos + 1)
    pos = pos + len
  end
  return pos
end

-- Value{int64_list_val{packed val}} -> the payload's first and last positions in v (last <
-- first: empty). Positions, not a copy: Redis' Lua hashes every byte of every string it
-- creates, so each intermediate copy of a stream field costs about what reading it does.
local function ints_span(v)
  if not v or #v == 0 then return 1, 0 end
  if string.byte(v, 1) ~= 114 then error('user stream field is not an int64 list') end
  local len, p = read_varint(v, 2)
  if len == 0 then return 1, 0 end
  local len2, p2 = read_varint(v, p + 1)
  return p2, p2 + len2 - 1
end

-- Value{string_list_val{val...}} -> the elements' first and last positions in v
local function strings_span(v)
  if not v or #v == 0 then return 1, 0 end
  if string.byte(v, 1) ~= 98 then error('user stream field is not a string list') end
  local len, p = read_varint(v, 2)
  return p, p + len - 1
end

-- Value{int64_list_val{kept .. new}} and Value{string_list_val{kept .. new}}, each built
-- in one concatenation (no intermediate copy of the kept part)
local function ints_value(kept, new)
  local n = #kept + #new
  if n == 0 then return '\114\0' end
  local vn = varint(n)
  return '\114' .. varint(1 + #vn + n) .. '\10' .. vn .. kept .. new
end

local function strings_value(kept, new)
  return '\98' .. varint(#kept + #new) .. kept .. new
end

-- A duplicate: nothing is written. If the stream still holds it, status 2 and the
-- history before it (its sample can be sent again); else status 0 and no history.
local function duplicate(cur, eid, want)
  if not want then return 0, '', '' end
  local eids = string.sub(cur[3] or '', strings_span(cur[3]))
  local p, i = 1, 0
  while p <= #eids do
    local len, q = read_varint(eids, p + 1)
    i = i + 1
    if len == #eid and string.sub(eids, q, q + len - 1) == eid then
      local tok0 = string.sub(cur[1] or '', ints_span(cur[1]))
      local act0 = string.sub(cur[2] or '', ints_span(cur[2]))
      return 2, ints_value(string.sub(tok0, 1, skip_varints(tok0, 1, (i - 1) * NC) - 1), ''),
             ints_value(string.sub(act0, 1, skip_varints(act0, 1, i - 1) - 1), '')
    end
    p = q + len
  end
  return 0, '', ''
end

-- The seen window: bucket b of B holds, in append order, the ids whose
-- sha1(id) % B is b, each as '\0' .. id .. '\255' .. seq (seq: the user's append count
-- when it was appended; ids are UTF-8 without NUL, so neither byte occurs in them). An id
-- is remembered while seq > total - W. A bucket is pruned of forgotten ids when written.
local function bucket_of(eid, nb)
  return tonumber(string.sub(redis.sha1hex(eid), 1, 8), 16) % nb
end

-- the seq of eid's record in bucket s, or nil
local function seq_in(s, eid)
  local p = string.find(s, '\0' .. eid .. '\255', 1, true)
  if p == nil then return nil end
  local q = p + #eid + 2
  local e = string.find(s, '\0', q, true)
  return tonumber(string.sub(s, q, (e or #s + 1) - 1))
end

-- bucket s without its leading records of seq <= limit (records are in seq order)
local function prune(s, limit)
  local p = 1
  while p <= #s do
    local q = string.find(s, '\255', p, true) + 1
    local e = string.find(s, '\0', q, true) or #s + 1
    if tonumber(string.sub(s, q, e - 1)) > limit then break end
    p = e
  end
  if p == 1 then return s end
  return string.sub(s, p)
end

-- every remembered (id, seq) of bucket string s, appended to recs
local function records(s, recs)
  local p = 1
  while p <= #s do
    local q = string.find(s, '\255', p, true)
    local e = string.find(s, '\0', q + 1, true) or #s + 1
    recs[#recs + 1] = {string.sub(s, p + 1, q - 1), tonumber(string.sub(s, q + 1, e - 1))}
    p = e
  end
end

-- Rewrite a user's window into B buckets from whatever layout it has: the previous
-- single NUL-delimited field (M_SEEN, oldest first), buckets of another count, or none
-- (a stream written without a window: its ids count as seen). Once per user and layout.
local function rebucket(key, cur, total)
  local recs = {}
  if cur[9] then  -- M_SEEN
    local ids = {}
    for id in string.gmatch(cur[9], '[^%z]+') do ids[#ids + 1] = id end
    for i, id in ipairs(ids) do recs[#recs + 1] = {id, total - #ids + i} end
  elseif cur[8] then  -- buckets of another count
    local nb = tonumber(cur[8])
    local names = {}
    for b = 0, nb - 1 do names[#names + 1] = SEEN_PREFIX .. b end
    for _, s in ipairs(redis.call('HMGET', key, unpack(names))) do
      if s then records(s, recs) end
    end
    table.sort(recs, function(x, y) return x[2] < y[2] end)
    redis.call('HDEL', key, unpack(names))
  elseif cur[3] then  -- a stream with no window
    local ve = cur[3]
    local p, e = strings_span(ve)
    local ids = {}
    while p <= e do
      local len, q = read_varint(ve, p + 1)
      ids[#ids + 1] = string.sub(ve, q, q + len - 1)
      p = q + len
    end
    for i, id in ipairs(ids) do recs[#recs + 1] = {id, total - #ids + i} end
  end
  local parts = {}
  for _, r in ipairs(recs) do
    if r[2] > total - W then
      local b = bucket_of(r[1], B)
      parts[b] = parts[b] or {}
      local t = parts[b]
      t[#t + 1] = '\0' .. r[1] .. '\255' .. r[2]
    end
  end
  local hset = {M_SEEN_B, tostring(B)}
  local buckets = {}
  for b, t in pairs(parts) do
    buckets[b] = table.concat(t)
    hset[#hset + 1] = SEEN_PREFIX .. b
    hset[#hset + 1] = buckets[b]
  end
  redis.call('HSET', key, unpack(hset))
  redis.call('HDEL', key, M_SEEN, M_SEEN_N)
  return buckets
end

local function append_one(key, eid, tokv, actv, timv, ms_str, ts, want)
  local b = bucket_of(eid, B)
  local fb = SEEN_PREFIX .. b
  local cur = redis.call('HMGET', key, F_TOK, F_ACT, F_EID, F_TIM, M_LEN, M_MAX, M_TOTAL, M_SEEN_B, M_SEEN, fb)
  local total = tonumber(cur[7] or '0')
  local bucket = cur[10] or ''
  if cur[8] ~= B_STR and (cur[8] or cur[9] or cur[3]) then
    bucket = rebucket(key, cur, total)[b] or ''
  end
  local seq = seq_in(bucket, eid)
  if seq and seq > total - W then
    return duplicate(cur, eid, want)
  end

  local n = tonumber(cur[5] or '0') + 1
  local drop = 0
  if n > T then
    drop = n - T
    n = T
  end
  -- Each field: the part kept (past the dropped items) and the new item, concatenated once.
  local vt, va, ve, vm = cur[1] or '', cur[2] or '', cur[3] or '', cur[4] or ''
  local t0, t1 = ints_span(vt)
  local a0, a1 = ints_span(va)
  local m0, m1 = ints_span(vm)
  local e0, e1 = strings_span(ve)
  local tok = ints_value(string.sub(vt, skip_varints(vt, t0, drop * NC), t1), tokv)
  local act = ints_value(string.sub(va, skip_varints(va, a0, drop), a1), actv)
  local tim = ints_value(string.sub(vm, skip_varints(vm, m0, drop), m1), timv)
  local eids = strings_value(string.sub(ve, skip_strings(ve, e0, drop), e1), '\10' .. varint(#eid) .. eid)
  total = total + 1
  bucket = prune(bucket, total - W) .. '\0' .. eid .. '\255' .. total

  local hset = {F_TOK, tok, F_ACT, act, F_EID, eids, F_TIM, tim, fb, bucket, M_SEEN_B, B_STR,
                M_LEN, tostring(n), M_TOTAL, tostring(total), P_N, '\32' .. varint(total)}
  -- Feast's event timestamp of both views is the newest event time seen (events may
  -- arrive out of time order; the stream keeps arrival order).
  local ms = tonumber(ms_str)
  if cur[6] == false or ms > tonumber(cur[6]) then
    for _, x in ipairs({M_MAX, ms_str, F_TS, ts, P_TS, ts, P_LAST, '\32' .. timv}) do
      hset[#hset + 1] = x
    end
  end
  redis.call('HSET', key, unpack(hset))
  -- The history: the stream's stored values as they were (the caller strips the wrapper;
  -- no copy is made here).
  if want then return 1, vt, va end
  return 1, '', ''
end

-- One call appends to every key in order (the same key may repeat). Arguments and
-- reply are each one length-prefixed blob: parsing thousands of separate arguments and
-- reply elements costs the client far more than the appends cost the server.
local status, out = {}, {''}
for i, key in ipairs(KEYS) do
  local eid = field()
  local tokv = field()
  local actv = field()
  local timv = field()
  local ms_str = field()
  local ts = field()
  local want
  want, pos = struct.unpack('<B', blob, pos)
  local appended, tok, act = append_one(key, eid, tokv, actv, timv, ms_str, ts, want == 1)
  status[i] = string.char(appended)
  out[2 * i], out[2 * i + 1] = tok, act
end
out[1] = table.concat(status)
return out
"""


_CLAIM_LUA = r"""
-- Claim a unique full semantic ID per item, atomically, in order. KEYS[1]: the project's
-- index hash: field 's' .. sid -> item id (decimal), 'i' .. item id -> sid, where sid is
-- the ID's tokens as protobuf varints. ARGV[1], per claim: u32-length-prefixed item id
-- (decimal) and prefix varints, then u16 n and n u32 candidates for the last token.
-- An item that holds an ID keeps it; otherwise it gets its first free candidate.
-- Reply: per claim, the sid the item holds ('' when every candidate is another item's).
local idx = KEYS[1]
local out = {}
while pos <= #blob do
  local item = field()
  local prefix = field()
  local n
  n, pos = struct.unpack('<I2', blob, pos)
  local held = redis.call('HGET', idx, 'i' .. item)
  if held then
    pos = pos + 4 * n
  else
    held = ''
    for _ = 1, n do
      local c
      c, pos = struct.unpack('<I4', blob, pos)
      if held == '' then
        local sid = prefix .. varint(c)
        if redis.call('HSETNX', idx, 's' .. sid, item) == 1 then
          redis.call('HSET', idx, 'i' .. item, sid)
          held = sid
        end
      end
    end
  end
  out[#out + 1] = held
end
return out
"""


_MULTI_HMGET_LUA = """
-- HMGET of the same three fields (ARGV) on every key; one blob of u32-length-prefixed
-- values (length 0: absent).
local out = {}
for _, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, ARGV[1], ARGV[2], ARGV[3])
  for j = 1, 3 do
    local x = v[j] or ''
    out[#out + 1] = struct.pack('<I4', #x) .. x
  end
end
return table.concat(out)
"""


def build_append_lua(config: OnlineStoreConfig) -> str:
    """The append script with this store's constants (T, n_codes, Feast field names) baked in."""
    fv, pf = enc.USER_STREAM_FV, enc.USER_PROFILE_FV
    subs = {
        "__NC__": str(config.n_codes),
        "__T__": str(config.stream_len),
        "__W__": str(config.seen_window),
        "__B__": str(config.seen_buckets),
        "__F_TOK__": _lua_bytes(enc.redis_field(fv, "sid_tokens")),
        "__F_ACT__": _lua_bytes(enc.redis_field(fv, "actions")),
        "__F_EID__": _lua_bytes(enc.redis_field(fv, "event_ids")),
        "__F_TIM__": _lua_bytes(enc.redis_field(fv, "event_times_ms")),
        "__F_TS__": _lua_bytes(enc.redis_ts_field(fv)),
        "__P_TS__": _lua_bytes(enc.redis_ts_field(pf)),
        "__P_N__": _lua_bytes(enc.redis_field(pf, "n_actions")),
        "__P_LAST__": _lua_bytes(enc.redis_field(pf, "last_action_ms")),
        # hisam's own bookkeeping fields; Feast reads only the fields it asks for.
        "__M_SEEN_B__": _lua_bytes(_redis_meta_field("seen_b")),
        "__SEEN_PREFIX__": _lua_bytes(_redis_meta_field("seen:")),
        "__M_SEEN__": _lua_bytes(_redis_meta_field("seen")),
        "__M_SEEN_N__": _lua_bytes(_redis_meta_field("seen_n")),
        "__M_LEN__": _lua_bytes(_redis_meta_field("len")),
        "__M_MAX__": _lua_bytes(_redis_meta_field("max_ms")),
        "__M_TOTAL__": _lua_bytes(_redis_meta_field("total")),
    }
    script = _LUA_PRELUDE + _APPEND_LUA
    for k, v in subs.items():
        script = script.replace(k, v)
    return script


class RedisStreamStore:
    """Appends and direct reads on Feast's Redis layout; thread-safe (a connection pool)."""

    def __init__(self, config: OnlineStoreConfig) -> None:
        import redis

        self.config = config
        self._redis = redis
        self._client = redis.Redis.from_url(self.config.redis_url)
        self._script = build_append_lua(self.config)
        self._sha = self._client.script_load(self._script)
        # redis-py's Script runs EVALSHA and loads the script again if the server lost it.
        self._mget = self._client.register_script(_MULTI_HMGET_LUA)
        self._claim = self._client.register_script(_LUA_PRELUDE + _CLAIM_LUA)
        self._sid_index_key = f"_hisam:{config.project}:item_sids".encode()
        fv = enc.USER_STREAM_FV
        self._stream_fields = [enc.redis_field(fv, f) for f in enc.STREAM_FEATURES]
        self._item_fields = [enc.redis_field(enc.ITEM_SID_FV, f) for f in enc.ITEM_FEATURES]
        # Hot-path helpers (per action): a key is a fixed head, the packed id, the project;
        # encoded tokens of an item and decoded item IDs recur from batch to batch.
        self._user_key_head = _entity_key_head(enc.USER_ID_KEY)
        self._item_key_head = _entity_key_head(enc.ITEM_ID_KEY)
        self._key_tail = config.project.encode("utf-8")
        self._token_varints: dict[tuple[int, ...], bytes] = {}
        self._decoded_items: dict[tuple[int, bytes, bytes | None, bytes | None], ItemSids] = {}

    def _key(self, user_id: int) -> bytes:
        return self._user_key_head + _I64.pack(user_id) + self._key_tail

    def _item_key(self, item_id: int) -> bytes:
        return self._item_key_head + _I64.pack(item_id) + self._key_tail

    def _record(self, a: StreamAction, want_history: bool) -> bytes:
        """One action's part of the script's argument blob (see the script header)."""
        a.validate(self.config.n_codes)
        u32 = _U32.pack
        eid = a.event_id.encode("utf-8")
        tokv = self._token_varints.get(a.item_tokens)
        if tokv is None:
            if len(self._token_varints) >= _CACHE_MAX:
                self._token_varints.clear()
            tokv = self._token_varints[a.item_tokens] = enc.varints(a.item_tokens)
        actv = _varint(a.action)
        ms = int(a.event_time_ms)
        timv = _varint(ms)
        ms_str = b"%d" % ms
        ts = enc.timestamp_bytes(ms)
        return b"".join(
            (
                u32(len(eid)), eid, u32(len(tokv)), tokv, u32(len(actv)), actv, u32(len(timv)), timv,
                u32(len(ms_str)), ms_str, u32(len(ts)), ts, b"\x01" if want_history else b"\x00",
            )
        )  # fmt: skip

    def _results(self, reply: list[bytes]) -> list[AppendResult]:
        """The script's reply (see its header) as AppendResults."""
        n_codes = self.config.n_codes
        return [
            AppendResult(
                st == 1,
                _ints_payload(tok),
                _ints_payload(act),
                n_codes,
                resampled=st == 2,
            )
            for st, tok, act in zip(reply[0], reply[1::2], reply[2::2])
        ]

    def append(self, action: StreamAction, want_history: bool = True) -> AppendResult:
        """Append one action: one EVALSHA round trip, atomic on the server."""
        return self.append_batch([action], want_history)[0]

    def append_batch(self, actions: Sequence[StreamAction], want_history: bool = True) -> list[AppendResult]:
        """Append many actions in order, in one round trip.

        Single-node Redis: one EVALSHA over all the batch's keys (the script is atomic as
        a whole). Redis Cluster (``redis_cluster``): one EVALSHA per action, pipelined,
        since a script may only touch keys of one hash slot.
        """
        if not actions:
            return []
        calls = [(self._key(a.user_id), self._record(a, want_history)) for a in actions]
        groups = [calls] if not self.config.redis_cluster else [[c] for c in calls]
        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            for group in groups:
                pipe.evalsha(self._sha, len(group), *[k for k, _ in group], b"".join(r for _, r in group))
            replies = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, self._redis.exceptions.NoScriptError) for r in replies):
                # Only a server that lost its scripts raises this, and then for every
                # call: none of them ran, so re-running the batch appends nothing twice.
                self._sha = self._client.script_load(self._script)
                continue
            break
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise OnlineStoreError(f"{len(errors)} of {len(groups)} append calls failed; first: {errors[0]}")
        return [res for reply in replies for res in self._results(reply)]

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]:
        """Direct read (one pipelined HMGET round trip); None for a user with no stream."""
        pipe = self._client.pipeline(transaction=False)
        for u in user_ids:
            pipe.hmget(self._key(u), self._stream_fields)
        return [_user_stream(u, raw, self.config.n_codes) for u, raw in zip(user_ids, pipe.execute())]

    def put_item_sids(self, items: Sequence[ItemSids]) -> None:
        """Write items' semantic IDs (last write wins; item events are keyed by item id)."""
        pipe = self._client.pipeline(transaction=False)
        ts_field = enc.redis_ts_field(enc.ITEM_SID_FV)
        for it in items:
            key = self._item_key(it.item_id)
            pipe.hset(
                key,
                mapping={
                    self._item_fields[0]: enc.int64_list_value(it.tokens),
                    self._item_fields[1]: enc.string_value(it.tokenizer_version),
                    ts_field: enc.timestamp_bytes(it.event_time_ms),
                },
            )
        pipe.execute()

    def claim_item_sids(self, claims: Sequence[SidClaim]) -> list[tuple[int, ...] | None]:
        """Each item's ID: the one it holds, else its first free candidate (``SidClaim``), claimed.

        Atomic and in order. Returns the item's tokens per claim; None when it holds none
        and every candidate is another item's. An ID, once an item's, stays its own: users'
        streams store IDs, not item ids, so an ID that moved or was freed would make their
        history name another item (a new tokenizer version re-assigns them all: ``hisam
        tokenizer migrate``). The index is one hash per project
        (``_hisam:<project>:item_sids``, one Redis Cluster slot): concurrent workers cannot
        both claim one ID.
        """
        if not claims:
            return []
        parts = []
        for c in claims:
            item, prefix = b"%d" % c.item_id, enc.varints(c.prefix)
            parts += [_U32.pack(len(item)), item, _U32.pack(len(prefix)), prefix, _U16.pack(len(c.last_tokens))]
            parts.append(struct.pack(f"<{len(c.last_tokens)}I", *c.last_tokens))
        got = self._claim(keys=[self._sid_index_key], args=[b"".join(parts)])
        return [tuple(enc.unpack_varints(sid)) if sid else None for sid in got]

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]:
        """Semantic IDs of the known items among ``item_ids`` (unknown ones are absent)."""
        from google.protobuf.timestamp_pb2 import Timestamp

        fields = [*self._item_fields, enc.redis_ts_field(enc.ITEM_SID_FV)]
        keys = [self._item_key(i) for i in item_ids]
        if not keys:
            return {}
        if self.config.redis_cluster:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, fields)
            rows = pipe.execute()
        else:  # one command and one flat reply: far less client-side parsing than N HMGETs
            blob = self._mget(keys=keys, args=fields)
            rows, pos = [], 0
            for _ in keys:
                row = []
                for _ in range(3):
                    (n,) = _U32.unpack_from(blob, pos)
                    row.append(blob[pos + 4 : pos + 4 + n] or None)
                    pos += 4 + n
                rows.append(row)
        out: dict[int, ItemSids] = {}
        decoded = self._decoded_items  # by the stored bytes: a changed item decodes afresh
        for i, (tok, ver, ts) in zip(item_ids, rows):
            if tok:
                i = int(i)
                it = decoded.get((i, tok, ver, ts))
                if it is None:
                    t = Timestamp.FromString(ts) if ts else Timestamp()
                    it = ItemSids(
                        item_id=i,
                        tokens=tuple(enc.decode_value(tok).int64_list_val.val),
                        tokenizer_version=enc.decode_value(ver).string_val,
                        event_time_ms=t.seconds * 1000 + t.nanos // 1_000_000,
                    )
                    if len(decoded) >= _CACHE_MAX:
                        decoded.clear()
                    decoded[(i, tok, ver, ts)] = it
                out[i] = it
        return out

    def close(self) -> None:
        self._client.close()

    # Whole-namespace access for re-tokenisation (stream/retokenize.py): not the hot path.

    def entity_ids(self, join_key: str = enc.USER_ID_KEY, scan_count: int = 1000) -> np.ndarray:
        """Ids of every entity of ``join_key`` stored under this project, sorted (int64).

        SCAN with a pattern that matches exactly Feast's key layout for this project (entity
        key header, any 8 value bytes, the project name), so another project's keys, even
        one whose name ends like this one, are never matched.
        """
        head = _entity_key_head(join_key)
        pattern = _glob_escape(head) + b"?" * 8 + _glob_escape(self.config.project.encode())
        ids = [_I64.unpack_from(k, len(head))[0] for k in self._client.scan_iter(match=pattern, count=scan_count)]
        return np.unique(np.asarray(ids, np.int64))

    def read_user_states(self, user_ids: Sequence[int]) -> list[UserState | None]:
        """Users' streams with their seen windows and profile counters (pipelined round trips)."""
        nb = self.config.seen_buckets
        pf = enc.USER_PROFILE_FV
        meta = [
            *(_redis_meta_field(n) for n in ("seen", "total", "max_ms", "seen_b")),
            enc.redis_field(pf, "n_actions"),
            enc.redis_field(pf, "last_action_ms"),
        ]
        head = len(self._stream_fields) + len(meta)  # the bucket fields follow
        fields = [*self._stream_fields, *meta, *_seen_bucket_fields(nb)]
        pipe = self._client.pipeline(transaction=False)
        for u in user_ids:
            pipe.hmget(self._key(u), fields)
        rows = pipe.execute()
        # A window in buckets of another count (W changed): read those buckets instead.
        other = {i: int(raw[7]) for i, raw in enumerate(rows) if raw[7] is not None and int(raw[7]) != nb}
        if other:
            pipe = self._client.pipeline(transaction=False)
            for i, b in other.items():
                pipe.hmget(self._key(user_ids[i]), _seen_bucket_fields(b))
            for i, got in zip(other, pipe.execute()):
                rows[i] = [*rows[i][:head], *got]
        out: list[UserState | None] = []
        for u, raw in zip(user_ids, rows):
            stream = _user_stream(u, raw[:4], self.config.n_codes)
            if stream is None:
                out.append(None)
                continue
            legacy, total, max_ms, seen_b, p_n, p_last = raw[4:head]
            if total is not None:
                n_actions = int(total)
            elif p_n is not None:
                n_actions = enc.decode_value(p_n).int64_val
            else:
                n_actions = len(stream)
            if seen_b is not None:
                recs = [r for b in raw[head:] if b for r in _seen_records(b)]
                recs.sort(key=lambda r: r[1])
                seen_ids = [e for e, seq in recs if seq > int(total or 0) - self.config.seen_window]
            elif legacy is not None:  # the single-field layout (before buckets)
                seen_ids = [x.decode() for x in legacy.split(b"\x00") if x]
            else:  # a stream written without a window: its ids count as seen
                seen_ids = list(stream.event_ids)
            if max_ms is not None:
                last = int(max_ms)
            elif p_last is not None:
                last = enc.decode_value(p_last).int64_val
            else:
                last = int(stream.event_times_ms.max())
            out.append(UserState(stream, seen_ids[-self.config.seen_window :], n_actions, last))
        return out

    def write_user_states(self, states: Sequence[UserState]) -> None:
        """Write whole user states (stream, seen window, counters), replacing what is stored.

        For filling a namespace no stream worker writes to (re-tokenisation): not atomic
        with appends. The fields are those the append script writes, byte for byte.
        """
        fv, pf = enc.USER_STREAM_FV, enc.USER_PROFILE_FV
        len_f, max_f, total_f, seen_b_f = (_redis_meta_field(n) for n in ("len", "max_ms", "total", "seen_b"))
        nb = self.config.seen_buckets
        bucket_fields = _seen_bucket_fields(nb)
        legacy = [_redis_meta_field("seen"), _redis_meta_field("seen_n")]
        pipe = self._client.pipeline(transaction=False)
        for st in states:
            st.check(self.config)
            s = st.stream
            ts = enc.timestamp_bytes(st.last_action_ms)
            mapping = {
                self._stream_fields[0]: enc.int64_list_value(s.tokens.ravel().tolist()),
                self._stream_fields[1]: enc.int64_list_value(s.actions.tolist()),
                self._stream_fields[2]: enc.string_list_value(s.event_ids),
                self._stream_fields[3]: enc.int64_list_value(s.event_times_ms.tolist()),
                enc.redis_ts_field(fv): ts,
                enc.redis_field(pf, "n_actions"): enc.int64_value(st.n_actions),
                enc.redis_field(pf, "last_action_ms"): enc.int64_value(st.last_action_ms),
                enc.redis_ts_field(pf): ts,
                len_f: str(len(s)),
                max_f: str(int(st.last_action_ms)),
                total_f: str(int(st.n_actions)),
                seen_b_f: str(nb),
            }
            buckets = _seen_buckets(st.seen_ids, st.n_actions, nb)
            mapping.update({bucket_fields[b]: v for b, v in buckets.items()})
            key = self._key(s.user_id)
            pipe.hdel(key, *legacy, *(f for b, f in enumerate(bucket_fields) if b not in buckets))
            pipe.hset(key, mapping=mapping)
        pipe.execute()


# ---- SQLite --------------------------------------------------------------------------

_FEAST_SQLITE_DDL = (
    # Feast 0.67's own DDL (feast/infra/online_stores/sqlite.py, update()); creating it
    # here lets the stream run before `apply`, and Feast's CREATE ... IF NOT EXISTS is
    # then a no-op.
    'CREATE TABLE IF NOT EXISTS "{t}" (entity_key BLOB, feature_name TEXT, value BLOB, value_text TEXT, '
    "vector_value BLOB, event_ts timestamp, created_ts timestamp, PRIMARY KEY(entity_key, feature_name))"
)

# The seen window (module doc): one row per remembered event id; ``seq`` is the user's
# append count when the id was appended (evict: seq <= n_actions - W). Not a Feast table.
_SEEN_DDL = (
    (
        'CREATE TABLE IF NOT EXISTS "{t}" (entity_key BLOB NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL, '
        "PRIMARY KEY(entity_key, event_id)) WITHOUT ROWID"
    ),
    'CREATE INDEX IF NOT EXISTS "{t}_by_seq" ON "{t}" (entity_key, seq)',
)


# The item semantic-ID index (RedisStreamStore.claim_item_sids): who holds each full ID.
_SID_DDL = 'CREATE TABLE IF NOT EXISTS "{t}" (sid BLOB PRIMARY KEY, item_id INTEGER NOT NULL UNIQUE) WITHOUT ROWID'


@dataclass
class _SqliteUser:
    key: bytes  # Feast's entity key
    tokens: list[int]
    actions: list[int]
    event_ids: list[str]
    times: list[int]
    n_actions: int
    last_ms: int | None
    new_ids: dict[str, int] = field(default_factory=dict)  # appended in this batch -> seq
    dirty: bool = False


class SqliteStreamStore:
    """Appends and direct reads on Feast's SQLite layout; one connection per thread."""

    def __init__(self, config: OnlineStoreConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._stream_t = enc.sqlite_table(config.project, enc.USER_STREAM_FV)
        self._profile_t = enc.sqlite_table(config.project, enc.USER_PROFILE_FV)
        self._item_t = enc.sqlite_table(config.project, enc.ITEM_SID_FV)
        self._seen_t = f"{config.project}_hisam_seen"
        self._sid_t = f"{config.project}_hisam_item_sids"
        config.sqlite_db.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        for t in (self._stream_t, self._profile_t, self._item_t):
            conn.execute(_FEAST_SQLITE_DDL.format(t=t))
        for ddl in _SEEN_DDL:
            conn.execute(ddl.format(t=self._seen_t))
        conn.execute(_SID_DDL.format(t=self._sid_t))

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode so that BEGIN IMMEDIATE is ours; WAL lets Feast's readers
            # run while a writer holds the lock; the busy timeout queues writers.
            conn = sqlite3.connect(str(self.config.sqlite_db), isolation_level=None, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _load(self, conn: sqlite3.Connection, user_id: int) -> _SqliteUser:
        ek = enc.entity_key_bytes(enc.USER_ID_KEY, user_id)
        rows = dict(conn.execute(f'SELECT feature_name, value FROM "{self._stream_t}" WHERE entity_key = ?', (ek,)))
        prof = dict(conn.execute(f'SELECT feature_name, value FROM "{self._profile_t}" WHERE entity_key = ?', (ek,)))
        last = enc.decode_value(prof.get("last_action_ms"))
        s = _SqliteUser(
            key=ek,
            tokens=list(enc.decode_value(rows.get("sid_tokens")).int64_list_val.val),
            actions=list(enc.decode_value(rows.get("actions")).int64_list_val.val),
            event_ids=list(enc.decode_value(rows.get("event_ids")).string_list_val.val),
            times=list(enc.decode_value(rows.get("event_times_ms")).int64_list_val.val),
            n_actions=enc.decode_value(prof.get("n_actions")).int64_val,
            last_ms=last.int64_val if last.HasField("int64_val") else None,
        )
        if (
            s.event_ids
            and conn.execute(f'SELECT 1 FROM "{self._seen_t}" WHERE entity_key = ? LIMIT 1', (ek,)).fetchone() is None
        ):
            # A stream written before the seen table existed: its ids start the window.
            first = s.n_actions - len(s.event_ids) + 1
            conn.executemany(
                f'INSERT OR IGNORE INTO "{self._seen_t}" (entity_key, event_id, seq) VALUES (?, ?, ?)',
                [(ek, e, first + i) for i, e in enumerate(s.event_ids)],
            )
        return s

    def _seen(self, conn: sqlite3.Connection, s: _SqliteUser, event_id: str) -> bool:
        """Whether ``event_id`` is among the user's last W appends (rows past that are stale)."""
        seq = s.new_ids.get(event_id)
        if seq is None:
            q = f'SELECT seq FROM "{self._seen_t}" WHERE entity_key = ? AND event_id = ?'
            row = conn.execute(q, (s.key, event_id)).fetchone()
            seq = row[0] if row else None
        return seq is not None and seq > s.n_actions - self.config.seen_window

    def _save(self, conn: sqlite3.Connection, s: _SqliteUser) -> None:
        ek = s.key
        ts = enc.sqlite_timestamp(s.last_ms or 0)
        upsert = (
            'INSERT INTO "{t}" (entity_key, feature_name, value, event_ts, created_ts) VALUES (?, ?, ?, ?, ?) '
            "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
            "event_ts = excluded.event_ts, created_ts = excluded.created_ts"
        )
        conn.executemany(
            upsert.format(t=self._stream_t),
            [
                (ek, "sid_tokens", enc.int64_list_value(s.tokens), ts, ts),
                (ek, "actions", enc.int64_list_value(s.actions), ts, ts),
                (ek, "event_ids", enc.string_list_value(s.event_ids), ts, ts),
                (ek, "event_times_ms", enc.int64_list_value(s.times), ts, ts),
            ],
        )
        conn.executemany(
            upsert.format(t=self._profile_t),
            [
                (ek, "n_actions", enc.int64_value(s.n_actions), ts, ts),
                (ek, "last_action_ms", enc.int64_value(s.last_ms or 0), ts, ts),
            ],
        )
        conn.executemany(
            f'INSERT OR REPLACE INTO "{self._seen_t}" (entity_key, event_id, seq) VALUES (?, ?, ?)',
            [(ek, e, q) for e, q in s.new_ids.items()],
        )
        conn.execute(
            f'DELETE FROM "{self._seen_t}" WHERE entity_key = ? AND seq <= ?',
            (ek, s.n_actions - self.config.seen_window),
        )

    def _apply(self, conn: sqlite3.Connection, s: _SqliteUser, a: StreamAction, want_history: bool) -> AppendResult:
        nc = self.config.n_codes
        if self._seen(conn, s, a.event_id):
            if want_history and a.event_id in s.event_ids:  # still in the stream: its sample can be rebuilt
                i = s.event_ids.index(a.event_id)
                return AppendResult(False, enc.varints(s.tokens[: i * nc]), enc.varints(s.actions[:i]), nc, True)
            return AppendResult(False, b"", b"", nc)
        hist = (enc.varints(s.tokens), enc.varints(s.actions)) if want_history else (b"", b"")
        s.tokens.extend(a.item_tokens)
        s.actions.append(a.action)
        s.event_ids.append(a.event_id)
        s.times.append(a.event_time_ms)
        drop = len(s.event_ids) - self.config.stream_len
        if drop > 0:
            del s.tokens[: drop * nc], s.actions[:drop], s.event_ids[:drop], s.times[:drop]
        s.n_actions += 1
        s.new_ids[a.event_id] = s.n_actions
        s.last_ms = a.event_time_ms if s.last_ms is None else max(s.last_ms, a.event_time_ms)
        s.dirty = True
        return AppendResult(True, *hist, nc)

    def append(self, action: StreamAction, want_history: bool = True) -> AppendResult:
        return self.append_batch([action], want_history)[0]

    def append_batch(self, actions: Sequence[StreamAction], want_history: bool = True) -> list[AppendResult]:
        """Append many actions in order, in one write transaction."""
        for a in actions:
            a.validate(self.config.n_codes)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            users: dict[int, _SqliteUser] = {}
            results = []
            for a in actions:
                s = users.get(a.user_id)
                if s is None:
                    s = users[a.user_id] = self._load(conn, a.user_id)
                results.append(self._apply(conn, s, a, want_history))
            for s in users.values():
                if s.dirty:
                    self._save(conn, s)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]:
        """Direct read of the users' streams (one query); None for a user with no stream."""
        conn = self._conn()
        keys = [enc.entity_key_bytes(enc.USER_ID_KEY, u) for u in user_ids]
        by_key: dict[bytes, dict[str, bytes]] = {}
        for start in range(0, len(keys), 500):  # SQLite caps bound parameters
            chunk = keys[start : start + 500]
            q = f'SELECT entity_key, feature_name, value FROM "{self._stream_t}" WHERE entity_key IN ({",".join("?" * len(chunk))})'
            for ek, name, value in conn.execute(q, chunk):
                by_key.setdefault(ek, {})[name] = value
        out = []
        for u, ek in zip(user_ids, keys):
            row = by_key.get(ek)
            out.append(
                None if row is None else _user_stream(u, [row.get(f) for f in enc.STREAM_FEATURES], self.config.n_codes)
            )
        return out

    def put_item_sids(self, items: Sequence[ItemSids]) -> None:
        conn = self._conn()
        upsert = (
            f'INSERT INTO "{self._item_t}" (entity_key, feature_name, value, event_ts, created_ts) VALUES (?, ?, ?, ?, ?) '
            "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
            "event_ts = excluded.event_ts, created_ts = excluded.created_ts"
        )
        rows = []
        for it in items:
            ek = enc.entity_key_bytes(enc.ITEM_ID_KEY, it.item_id)
            ts = enc.sqlite_timestamp(it.event_time_ms)
            rows.append((ek, "sid_tokens", enc.int64_list_value(it.tokens), ts, ts))
            rows.append((ek, "tokenizer_version", enc.string_value(it.tokenizer_version), ts, ts))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(upsert, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def claim_item_sids(self, claims: Sequence[SidClaim]) -> list[tuple[int, ...] | None]:
        """As ``RedisStreamStore.claim_item_sids``, in one ``BEGIN IMMEDIATE`` transaction."""
        if not claims:
            return []
        conn = self._conn()
        t = self._sid_t
        out: list[tuple[int, ...] | None] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for c in claims:
                row = conn.execute(f'SELECT sid FROM "{t}" WHERE item_id = ?', (c.item_id,)).fetchone()
                held = tuple(enc.unpack_varints(row[0])) if row else None
                for k in range(len(c.last_tokens) if held is None else 0):
                    cur = conn.execute(
                        f'INSERT OR IGNORE INTO "{t}" (sid, item_id) VALUES (?, ?)',
                        (enc.varints(c.candidate(k)), c.item_id),
                    )
                    if cur.rowcount == 1:
                        held = c.candidate(k)
                        break
                out.append(held)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return out

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]:
        """Semantic IDs of the known items among ``item_ids`` (unknown ones are absent)."""
        conn = self._conn()
        keys = {enc.entity_key_bytes(enc.ITEM_ID_KEY, i): int(i) for i in item_ids}
        klist = list(keys)
        rows: dict[int, dict[str, tuple[bytes, int]]] = {}
        for start in range(0, len(klist), 500):  # SQLite caps bound parameters
            chunk = klist[start : start + 500]
            q = f'SELECT entity_key, feature_name, value, event_ts FROM "{self._item_t}" WHERE entity_key IN ({",".join("?" * len(chunk))})'
            for ek, name, value, ts in conn.execute(q, chunk):
                rows.setdefault(keys[ek], {})[name] = (value, ts)
        out: dict[int, ItemSids] = {}
        for i, r in rows.items():
            if "sid_tokens" in r:
                out[i] = ItemSids(
                    item_id=i,
                    tokens=tuple(enc.decode_value(r["sid_tokens"][0]).int64_list_val.val),
                    tokenizer_version=enc.decode_value(r.get("tokenizer_version", (None, 0))[0]).string_val,
                    event_time_ms=int(r["sid_tokens"][1] or 0) * 1000,
                )
        return out

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # Whole-namespace access for re-tokenisation (stream/retokenize.py): not the hot path.

    def entity_ids(self, join_key: str = enc.USER_ID_KEY) -> np.ndarray:
        """Ids of every entity of ``join_key`` stored under this project, sorted (int64)."""
        tables = {enc.USER_ID_KEY: self._stream_t, enc.ITEM_ID_KEY: self._item_t}
        if join_key not in tables:
            raise ValueError(f"join_key must be one of {sorted(tables)}, got {join_key!r}")
        head = _entity_key_head(join_key)
        rows = self._conn().execute(f'SELECT DISTINCT entity_key FROM "{tables[join_key]}"')
        ids = [_I64.unpack_from(ek, len(head))[0] for (ek,) in rows if len(ek) == len(head) + 8 and ek.startswith(head)]
        return np.unique(np.asarray(ids, np.int64))

    def read_user_states(self, user_ids: Sequence[int]) -> list[UserState | None]:
        """Users' streams with their seen windows and profile counters (read only)."""
        conn = self._conn()
        streams = self.read_streams(user_ids)
        keys = [enc.entity_key_bytes(enc.USER_ID_KEY, u) for u in user_ids]
        prof: dict[bytes, dict[str, bytes]] = {}
        seen: dict[bytes, list[tuple[int, str]]] = {}
        for start in range(0, len(keys), 500):  # SQLite caps bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            q = f'SELECT entity_key, feature_name, value FROM "{self._profile_t}" WHERE entity_key IN ({marks})'
            for ek, name, value in conn.execute(q, chunk):
                prof.setdefault(ek, {})[name] = value
            q = f'SELECT entity_key, seq, event_id FROM "{self._seen_t}" WHERE entity_key IN ({marks})'
            for ek, seq, eid in conn.execute(q, chunk):
                seen.setdefault(ek, []).append((seq, eid))
        out: list[UserState | None] = []
        for ek, s in zip(keys, streams):
            if s is None:
                out.append(None)
                continue
            p = prof.get(ek, {})
            n_actions = enc.decode_value(p["n_actions"]).int64_val if "n_actions" in p else len(s)
            last = enc.decode_value(p.get("last_action_ms"))
            last_ms = last.int64_val if last.HasField("int64_val") else int(s.event_times_ms.max())
            rows = sorted(seen.get(ek, []))
            # Rows at or below n_actions - W are stale (see _seen); none at all: a stream
            # written before the seen table existed, whose ids start the window (see _load).
            ids = [e for q, e in rows if q > n_actions - self.config.seen_window] if rows else list(s.event_ids)
            out.append(UserState(s, ids, n_actions, last_ms))
        return out

    def write_user_states(self, states: Sequence[UserState]) -> None:
        """Write whole user states (stream, seen window, counters) in one transaction, replacing them.

        For filling a namespace no stream worker writes to (re-tokenisation). The rows are
        those an append writes; the window's ids get consecutive sequence numbers ending at
        ``n_actions``, as appends give them.
        """
        upsert = (
            'INSERT INTO "{t}" (entity_key, feature_name, value, event_ts, created_ts) VALUES (?, ?, ?, ?, ?) '
            "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
            "event_ts = excluded.event_ts, created_ts = excluded.created_ts"
        )
        stream_rows, profile_rows, seen_rows, keys = [], [], [], []
        for st in states:
            st.check(self.config)
            s = st.stream
            ek = enc.entity_key_bytes(enc.USER_ID_KEY, s.user_id)
            ts = enc.sqlite_timestamp(st.last_action_ms)
            keys.append((ek,))
            stream_rows += [
                (ek, "sid_tokens", enc.int64_list_value(s.tokens.ravel().tolist()), ts, ts),
                (ek, "actions", enc.int64_list_value(s.actions.tolist()), ts, ts),
                (ek, "event_ids", enc.string_list_value(s.event_ids), ts, ts),
                (ek, "event_times_ms", enc.int64_list_value(s.event_times_ms.tolist()), ts, ts),
            ]
            profile_rows += [
                (ek, "n_actions", enc.int64_value(st.n_actions), ts, ts),
                (ek, "last_action_ms", enc.int64_value(st.last_action_ms), ts, ts),
            ]
            first = st.n_actions - len(st.seen_ids) + 1
            seen_rows += [(ek, e, first + i) for i, e in enumerate(st.seen_ids)]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(upsert.format(t=self._stream_t), stream_rows)
            conn.executemany(upsert.format(t=self._profile_t), profile_rows)
            conn.executemany(f'DELETE FROM "{self._seen_t}" WHERE entity_key = ?', keys)
            conn.executemany(f'INSERT INTO "{self._seen_t}" (entity_key, event_id, seq) VALUES (?, ?, ?)', seen_rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


# ---- reads through Feast ---------------------------------------------------------------


def feast_read_streams(store: FeatureStore, user_ids: Sequence[int], n_codes: int) -> list[UserStream | None]:
    """Users' streams through Feast's ``get_online_features`` (the reference read path)."""
    refs = [f"{enc.USER_STREAM_FV}:{f}" for f in enc.STREAM_FEATURES]
    got = store.get_online_features(features=refs, entity_rows=[{enc.USER_ID_KEY: int(u)} for u in user_ids]).to_dict()
    out: list[UserStream | None] = []
    for i, u in enumerate(user_ids):
        eids = got["event_ids"][i]
        if eids is None:
            out.append(None)
            continue
        out.append(
            UserStream(
                user_id=int(u),
                tokens=np.asarray(got["sid_tokens"][i] or [], np.int64).reshape(-1, n_codes),
                actions=np.asarray(got["actions"][i] or [], np.int64),
                event_ids=list(eids),
                event_times_ms=np.asarray(got["event_times_ms"][i] or [], np.int64),
            )
        )
    return out


def feast_read_item_sids(store: FeatureStore, item_ids: Sequence[int]) -> Mapping[int, list[int] | None]:
    """Items' semantic IDs through Feast (None for an unknown item)."""
    got = store.get_online_features(
        features=[f"{enc.ITEM_SID_FV}:sid_tokens"], entity_rows=[{enc.ITEM_ID_KEY: int(i)} for i in item_ids]
    ).to_dict()
    return {int(i): got["sid_tokens"][k] for k, i in enumerate(item_ids)}


# ---- whole user states (re-tokenisation) -----------------------------------------------


@dataclass(frozen=True)
class UserState:
    """Everything the store keeps for one user: stream, seen window and profile counters.

    What copying a user to another namespace must carry over (stream/retokenize.py), so
    that appends there continue exactly where they stopped here: ``seen_ids`` is the
    idempotency window, oldest first (at most W); ``n_actions`` the appends ever counted
    (``user_profile:n_actions``); ``last_action_ms`` the newest event time (Feast's event
    time of both user views, and ``user_profile:last_action_ms``).
    """

    stream: UserStream
    seen_ids: list[str]
    n_actions: int
    last_action_ms: int

    def check(self, config: OnlineStoreConfig) -> None:
        """Refuse a state the store's contract cannot hold (before anything is written)."""
        s = self.stream
        n = len(s.event_ids)
        if s.tokens.shape != (n, config.n_codes) or len(s.actions) != n or len(s.event_times_ms) != n:
            raise ValueError(
                f"user {s.user_id}: tokens {s.tokens.shape}, {len(s.actions)} actions, {len(s.event_times_ms)} "
                f"times for {n} events; the store keeps {config.n_codes} tokens per item"
            )
        if n > config.stream_len or len(self.seen_ids) > config.seen_window:
            raise ValueError(
                f"user {s.user_id}: {n} events / {len(self.seen_ids)} seen ids exceed the store's "
                f"T={config.stream_len} / W={config.seen_window}"
            )
        for e in (*s.event_ids, *self.seen_ids):
            if not e or "\x00" in e or len(e.encode("utf-8")) > MAX_EVENT_ID_BYTES:
                raise ValueError(f"user {s.user_id}: invalid event id {e[:40]!r}")
        if self.n_actions < n or self.last_action_ms < 0:
            raise ValueError(f"user {s.user_id}: n_actions {self.n_actions} < {n} events, or negative last time")


class NamespaceStore(StreamStore, Protocol):
    """A StreamStore that can also list and copy a whole namespace (both stores are)."""

    def entity_ids(self, join_key: str = enc.USER_ID_KEY) -> np.ndarray: ...

    def read_user_states(self, user_ids: Sequence[int]) -> list[UserState | None]: ...

    def write_user_states(self, states: Sequence[UserState]) -> None: ...


_I64 = struct.Struct("<q")


def _entity_key_head(join_key: str) -> bytes:
    """Feast's entity key for ``join_key`` without its 8 value bytes (the same for every id)."""
    return enc.entity_key_bytes(join_key, 0)[: -_I64.size]


def _glob_escape(b: bytes) -> bytes:
    """Bytes matched literally by a Redis glob pattern (SCAN MATCH)."""
    return b"".join(b"\\" + bytes((c,)) if c in b"*?[]\\" else bytes((c,)) for c in b)


def _redis_meta_field(name: str) -> bytes:
    """hisam's own bookkeeping fields in a user's hash (see build_append_lua)."""
    return f"_hisam:{enc.USER_STREAM_FV}:{name}".encode()


def _seen_bucket_fields(n_buckets: int) -> list[bytes]:
    return [_redis_meta_field(f"seen:{b}") for b in range(n_buckets)]


def seen_bucket(event_id: str, n_buckets: int) -> int:
    """The seen-window bucket of an event id (the append script's ``bucket_of``)."""
    return int(hashlib.sha1(event_id.encode("utf-8")).hexdigest()[:8], 16) % n_buckets


def _seen_buckets(seen_ids: Sequence[str], n_actions: int, n_buckets: int) -> dict[int, bytes]:
    """A window (oldest first, the newest appended as number ``n_actions``) as bucket values."""
    parts: dict[int, list[bytes]] = {}
    first = n_actions - len(seen_ids) + 1
    for i, e in enumerate(seen_ids):
        parts.setdefault(seen_bucket(e, n_buckets), []).append(b"\x00%s\xff%d" % (e.encode("utf-8"), first + i))
    return {b: b"".join(v) for b, v in parts.items()}


def _seen_records(bucket: bytes) -> list[tuple[str, int]]:
    """(event id, seq) of a bucket value, in its order."""
    out = []
    for rec in bucket.split(b"\x00")[1:]:
        e, _, seq = rec.partition(b"\xff")
        out.append((e.decode("utf-8"), int(seq)))
    return out
