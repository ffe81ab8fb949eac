"""Online-store access for the stream and serving: the append Feast lacks, and direct reads.

Feast has no append, and a read-modify-write append through Feast loses updates when two
writers touch one user (ENVIRONMENT.md measured 40% lost); Feast's Redis writer also
skips a write whose event time is not newer than the stored one. So appends bypass Feast
and write Feast's own storage layout (``features.encoding``) atomically:

* Redis: one Lua script per append (EVALSHA, one round trip, atomic on the server). It
  reads the user's hash, checks the event id against a window of seen ids, appends the
  item's tokens / action / event id / time to the packed protobuf lists, drops the oldest
  items beyond T, bumps the profile counters and writes everything back. The batched
  variant pipelines one EVALSHA per action: still one round trip per batch.
* SQLite: one ``BEGIN IMMEDIATE`` transaction per append or per batch, against Feast's
  table layout; SQLite's write lock serialises concurrent writers.

Idempotency: every appended event id is remembered in a per-user *seen window* of the
last ``seen_window`` (W) appended ids, independent of T. An action whose id is in the window
is a duplicate: nothing is written and it produces no TrainingSample (its sample was
produced when it was first appended). The window must cover the longest redelivery of one
user's actions: at-least-once redelivers what was written but not yet committed, at most
the batch in flight plus the acked batches awaiting their offset commit, so the worker
requires W >= 2 x its batch size (``stream.app``); the default 1024 covers the default
batches of 500. Memory is bounded: W ids of at most ``MAX_EVENT_ID_BYTES`` per user.

* Redis: the window is a field of the user's own hash (``_hisam:user_stream:seen``, the
  ids NUL-delimited, oldest first, with its count in ``..:seen_n``). In the user's hash it
  is written by the same script call, lives in the same Redis Cluster slot whatever the
  key's bytes (Feast's binary keys can contain ``{``/``}``, so no hash tag could follow a
  separate key reliably), and is deleted with the entity by Feast's
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


class StreamStore(Protocol):
    """What the stream and serving need from the online store."""

    config: OnlineStoreConfig

    def append(self, action: StreamAction, want_history: bool = True) -> AppendResult: ...

    def append_batch(self, actions: Sequence[StreamAction], want_history: bool = True) -> list[AppendResult]: ...

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]: ...

    def put_item_sids(self, items: Sequence[ItemSids]) -> None: ...

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
_REPLY_HEAD = struct.Struct("<BII")  # appended, len(history token varints), len(history action varints)


def _lua_bytes(b: bytes) -> str:
    """A Lua string literal holding arbitrary bytes (decimal escapes)."""
    return '"' + "".join(f"\\{c}" for c in b) + '"'


_APPEND_LUA = r"""
-- Atomic, idempotent, bounded append of actions to users' streams in Feast's Redis
-- layout (see features/encoding.py). KEYS[i]: the i-th action's user hash key.
-- ARGV[1], per action: u32-length-prefixed event_id, token varints, action varint,
-- time varint, time ms (decimal), Timestamp proto bytes; then a u8 want_history.
-- Reply, per action: u8 status (1 appended, 0 duplicate, 2 duplicate still in the stream),
-- u32 len(tokens), u32 len(actions), then the user's token and action varints before the
-- action (the history; empty when not wanted, and for a duplicate the stream no longer
-- holds). Idempotency: the last W appended event ids of the user (M_SEEN).
local NC = __NC__
local T = __T__
local W = __W__
local F_TOK, F_ACT, F_EID, F_TIM = __F_TOK__, __F_ACT__, __F_EID__, __F_TIM__
local F_TS, P_TS, P_N, P_LAST = __F_TS__, __P_TS__, __P_N__, __P_LAST__
local M_SEEN, M_SEEN_N, M_LEN, M_MAX, M_TOTAL = __M_SEEN__, __M_SEEN_N__, __M_LEN__, __M_MAX__, __M_TOTAL__

local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end

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

-- Value{int64_list_val{packed val}} -> packed payload
local function unwrap_ints(v)
  if not v or #v == 0 then return '' end
  if string.byte(v, 1) ~= 114 then error('user stream field is not an int64 list') end
  local len, p = read_varint(v, 2)
  if len == 0 then return '' end
  local len2, p2 = read_varint(v, p + 1)
  return string.sub(v, p2, p2 + len2 - 1)
end

local function wrap_ints(payload)
  if #payload == 0 then return '\114\0' end
  local inner = '\10' .. varint(#payload) .. payload
  return '\114' .. varint(#inner) .. inner
end

-- Value{string_list_val{val...}} -> concatenated elements
local function unwrap_strings(v)
  if not v or #v == 0 then return '' end
  if string.byte(v, 1) ~= 98 then error('user stream field is not a string list') end
  local len, p = read_varint(v, 2)
  return string.sub(v, p, p + len - 1)
end

-- Drop the oldest ids of the seen window (NUL-delimited, leading NUL) beyond W.
local function trim_seen(seen, count)
  if count <= W then return seen, count end
  local p = 1
  for _ = 1, count - W do p = string.find(seen, '\0', p + 1, true) end
  return string.sub(seen, p), W
end

-- A duplicate: nothing is written. If the stream still holds it, status 2 and the
-- history before it (its sample can be sent again); else status 0 and no history.
local function duplicate(cur, eid, want)
  if not want then return 0, '', '' end
  local eids = unwrap_strings(cur[3])
  local p, i = 1, 0
  while p <= #eids do
    local len, q = read_varint(eids, p + 1)
    i = i + 1
    if len == #eid and string.sub(eids, q, q + len - 1) == eid then
      local tok0, act0 = unwrap_ints(cur[1]), unwrap_ints(cur[2])
      return 2, string.sub(tok0, 1, skip_varints(tok0, 1, (i - 1) * NC) - 1),
             string.sub(act0, 1, skip_varints(act0, 1, i - 1) - 1)
    end
    p = q + len
  end
  return 0, '', ''
end

local function append_one(key, eid, tokv, actv, timv, ms_str, ts, want)
  local cur = redis.call('HMGET', key, F_TOK, F_ACT, F_EID, F_TIM, M_SEEN, M_LEN, M_MAX, M_TOTAL, M_SEEN_N)
  local seen = cur[5] or '\0'
  if string.find(seen, '\0' .. eid .. '\0', 1, true) then
    return duplicate(cur, eid, want)
  end

  local tok0, act0 = unwrap_ints(cur[1]), unwrap_ints(cur[2])
  local n = tonumber(cur[6] or '0')
  local tok = tok0 .. tokv
  local act = act0 .. actv
  local tim = unwrap_ints(cur[4]) .. timv
  local eids = unwrap_strings(cur[3]) .. '\10' .. varint(#eid) .. eid
  n = n + 1
  if n > T then
    local drop = n - T
    tok = string.sub(tok, skip_varints(tok, 1, drop * NC))
    act = string.sub(act, skip_varints(act, 1, drop))
    tim = string.sub(tim, skip_varints(tim, 1, drop))
    eids = string.sub(eids, skip_strings(eids, 1, drop))
    n = T
  end
  -- The seen window: its count is stored; a hash written before the count existed (the
  -- window then held the stream's ids) is counted once.
  local seen_n = tonumber(cur[9] or '')
  if seen_n == nil then
    local _, delims = string.gsub(seen, '%z', '')
    seen_n = delims - 1
  end
  seen, seen_n = trim_seen(seen .. eid .. '\0', seen_n + 1)
  local total = tonumber(cur[8] or '0') + 1

  local hset = {F_TOK, wrap_ints(tok), F_ACT, wrap_ints(act), F_EID, '\98' .. varint(#eids) .. eids,
                F_TIM, wrap_ints(tim), M_SEEN, seen, M_SEEN_N, tostring(seen_n), M_LEN, tostring(n),
                M_TOTAL, tostring(total), P_N, '\32' .. varint(total)}
  -- Feast's event timestamp of both views is the newest event time seen (events may
  -- arrive out of time order; the stream keeps arrival order).
  local ms = tonumber(ms_str)
  if cur[7] == false or ms > tonumber(cur[7]) then
    for _, x in ipairs({M_MAX, ms_str, F_TS, ts, P_TS, ts, P_LAST, '\32' .. timv}) do
      hset[#hset + 1] = x
    end
  end
  redis.call('HSET', key, unpack(hset))
  if not want then return 1, '', '' end
  return 1, tok0, act0
end

-- One call appends to every key in order (the same key may repeat). Arguments and
-- reply are each one length-prefixed blob: parsing thousands of separate arguments and
-- reply elements costs the client far more than the appends cost the server.
local blob = ARGV[1]
local pos = 1
local function field()
  local n
  n, pos = struct.unpack('<I4', blob, pos)
  local v = string.sub(blob, pos, pos + n - 1)
  pos = pos + n
  return v
end
local out = {}
for _, key in ipairs(KEYS) do
  local eid = field()
  local tokv = field()
  local actv = field()
  local timv = field()
  local ms_str = field()
  local ts = field()
  local want
  want, pos = struct.unpack('<B', blob, pos)
  local appended, tok, act = append_one(key, eid, tokv, actv, timv, ms_str, ts, want == 1)
  out[#out + 1] = struct.pack('<BI4I4', appended, #tok, #act) .. tok .. act
end
return table.concat(out)
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
        "__F_TOK__": _lua_bytes(enc.redis_field(fv, "sid_tokens")),
        "__F_ACT__": _lua_bytes(enc.redis_field(fv, "actions")),
        "__F_EID__": _lua_bytes(enc.redis_field(fv, "event_ids")),
        "__F_TIM__": _lua_bytes(enc.redis_field(fv, "event_times_ms")),
        "__F_TS__": _lua_bytes(enc.redis_ts_field(fv)),
        "__P_TS__": _lua_bytes(enc.redis_ts_field(pf)),
        "__P_N__": _lua_bytes(enc.redis_field(pf, "n_actions")),
        "__P_LAST__": _lua_bytes(enc.redis_field(pf, "last_action_ms")),
        # hisam's own bookkeeping fields; Feast reads only the fields it asks for.
        "__M_SEEN__": _lua_bytes(f"_hisam:{fv}:seen".encode()),
        "__M_SEEN_N__": _lua_bytes(f"_hisam:{fv}:seen_n".encode()),
        "__M_LEN__": _lua_bytes(f"_hisam:{fv}:len".encode()),
        "__M_MAX__": _lua_bytes(f"_hisam:{fv}:max_ms".encode()),
        "__M_TOTAL__": _lua_bytes(f"_hisam:{fv}:total".encode()),
    }
    script = _APPEND_LUA
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
        self._mget_sha = self._client.script_load(_MULTI_HMGET_LUA)
        fv = enc.USER_STREAM_FV
        self._stream_fields = [enc.redis_field(fv, f) for f in enc.STREAM_FEATURES]
        self._item_fields = [enc.redis_field(enc.ITEM_SID_FV, f) for f in enc.ITEM_FEATURES]

    def _key(self, user_id: int) -> bytes:
        return enc.redis_key(self.config.project, enc.USER_ID_KEY, user_id)

    def _record(self, a: StreamAction, want_history: bool) -> bytes:
        """One action's part of the script's argument blob (see the script header)."""
        a.validate(self.config.n_codes)
        parts = []
        for f in (
            a.event_id.encode("utf-8"),
            enc.varints(a.item_tokens),
            enc.varints((a.action,)),
            enc.varints((a.event_time_ms,)),
            str(int(a.event_time_ms)).encode(),
            enc.timestamp_bytes(a.event_time_ms),
        ):
            parts += (_U32.pack(len(f)), f)
        parts.append(b"\x01" if want_history else b"\x00")
        return b"".join(parts)

    def _results(self, blob: bytes) -> list[AppendResult]:
        out = []
        pos, n_codes = 0, self.config.n_codes
        while pos < len(blob):
            status, lt, la = _REPLY_HEAD.unpack_from(blob, pos)
            pos += _REPLY_HEAD.size
            hist = blob[pos : pos + lt], blob[pos + lt : pos + lt + la]
            out.append(AppendResult(status == 1, *hist, n_codes, resampled=status == 2))
            pos += lt + la
        return out

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
        return [res for blob in replies for res in self._results(blob)]

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
            key = enc.redis_key(self.config.project, enc.ITEM_ID_KEY, it.item_id)
            pipe.hset(
                key,
                mapping={
                    self._item_fields[0]: enc.int64_list_value(it.tokens),
                    self._item_fields[1]: enc.string_value(it.tokenizer_version),
                    ts_field: enc.timestamp_bytes(it.event_time_ms),
                },
            )
        pipe.execute()

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]:
        """Semantic IDs of the known items among ``item_ids`` (unknown ones are absent)."""
        from google.protobuf.timestamp_pb2 import Timestamp

        fields = [*self._item_fields, enc.redis_ts_field(enc.ITEM_SID_FV)]
        keys = [enc.redis_key(self.config.project, enc.ITEM_ID_KEY, i) for i in item_ids]
        if not keys:
            return {}
        if self.config.redis_cluster:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, fields)
            rows = pipe.execute()
        else:  # one command and one flat reply: far less client-side parsing than N HMGETs
            try:
                blob = self._client.evalsha(self._mget_sha, len(keys), *keys, *fields)
            except self._redis.exceptions.NoScriptError:  # server restarted or flushed its scripts
                self._mget_sha = self._client.script_load(_MULTI_HMGET_LUA)
                blob = self._client.evalsha(self._mget_sha, len(keys), *keys, *fields)
            rows, pos = [], 0
            for _ in keys:
                row = []
                for _ in range(3):
                    (n,) = _U32.unpack_from(blob, pos)
                    row.append(blob[pos + 4 : pos + 4 + n] or None)
                    pos += 4 + n
                rows.append(row)
        out: dict[int, ItemSids] = {}
        for i, (tok, ver, ts) in zip(item_ids, rows):
            if tok:
                t = Timestamp.FromString(ts) if ts else Timestamp()
                out[int(i)] = ItemSids(
                    item_id=int(i),
                    tokens=tuple(enc.decode_value(tok).int64_list_val.val),
                    tokenizer_version=enc.decode_value(ver).string_val,
                    event_time_ms=t.seconds * 1000 + t.nanos // 1_000_000,
                )
        return out

    def close(self) -> None:
        self._client.close()


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
        config.sqlite_db.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        for t in (self._stream_t, self._profile_t, self._item_t):
            conn.execute(_FEAST_SQLITE_DDL.format(t=t))
        for ddl in _SEEN_DDL:
            conn.execute(ddl.format(t=self._seen_t))

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
