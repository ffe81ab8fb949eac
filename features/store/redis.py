"""The Redis store: appends by one Lua script call, direct reads of Feast's hashes.

* An append is one Lua script (EVALSHA, one round trip, atomic on the server;
  features/store/lua/append.lua). It reads the user's hash, checks the event id against
  the seen window, appends the item's tokens / action / event id / time to the packed
  protobuf lists, drops the oldest items beyond T, bumps the profile counters and writes
  everything back. A batch is one script call over all its actions (Redis Cluster: one
  call per action, pipelined): one round trip per batch.
* The seen window is kept in the user's own hash, in B = ceil(W / 32) bucket fields
  (``_hisam:user_stream:seen:<b>``, B in ``..:seen_b``): an id goes to bucket
  ``int(sha1(id)[:8], 16) % B`` as ``NUL id 0xFF seq``, in append order, where seq is the
  user's append count then; it is remembered while seq > count - W, and a bucket drops its
  forgotten ids whenever it is written. So an append reads and rewrites about 32 ids, not
  W (the window as one field of W ids cost more of the script's time than the stream
  itself). A window of another bucket count (after a change of W) is moved into this
  count's buckets on the user's first append. In the user's hash the window is written by
  the same script call, lives in the same Redis Cluster slot whatever the key's bytes
  (Feast's binary keys can contain ``{``/``}``, so no hash tag could follow a separate key
  reliably), and is deleted with the entity by Feast's ``delete_entity_values``; Feast
  reads only the fields it asks for.
* Per-user isolation: the script checks each user's stored state before it writes anything
  for that user (the script's header says what it checks). A user whose state is not in
  this layout (a key of another type, a field that does not parse, a foreign window bucket)
  is refused: its actions come back ``refused=CORRUPT_USER_STATE`` with the key and what is
  wrong, nothing is written for it, one warning is logged per user and call, and the other
  users of the batch are appended as usual. Nothing else remembers a refused user: while
  its state stays corrupt, each of its later actions is refused again by the same check.
* Timeouts: the client's socket and connect timeouts are the config's
  (``redis_socket_timeout_s``, ``redis_connect_timeout_s``); a timeout is not retried
  here (the callers retry), a dropped connection once.
* ``claim_layout`` records n_codes and T in ``_hisam:<project>:layout`` and refuses a
  store configured otherwise.
* The applied record (``append_batch``'s ``applied``, ``applied_offsets``): the hash
  ``_hisam:<project>:applied``, field ``<topic>:<partition>`` -> the highest source offset
  a batch applied and its record's timestamp (``offset@ms``), set to max(old, new) by the
  same script call as the batch's appends (features/store/lua/applied.lua). Redis Cluster:
  a second call once every append of the batch succeeded (the record lives in another
  slot), so it never runs ahead of the appends.
* Deleted users (features/store/deletion.py): the append drops the actions of a user in the
  namespace's deleted-users marker, in the same script call.

Thread-safe: one connection pool per store.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Sequence
from importlib import resources

import numpy as np

from features import encoding as enc
from features.store.base import (
    I64,
    Applied,
    OnlineStoreError,
    applied_rows,
    check_layout,
    decode_user_stream,
    entity_key_head,
    ints_payload,
    layout_record,
    redis_meta_field,
    seen_bucket_fields,
    seen_bucket_values,
    seen_records,
)
from features.store.config import OnlineStoreConfig
from features.store.markers import redis_deleted_key, redis_deleted_keys
from features.store.records import (
    CORRUPT_USER_STATE,
    USER_DELETED,
    AppendResult,
    AppliedOffset,
    ItemSids,
    SidClaim,
    StreamAction,
    UserState,
    UserStream,
)

log = logging.getLogger(__name__)

_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_CACHE_MAX = 1 << 16  # entries of RedisStreamStore's encode/decode caches (cleared when full)
_REFUSED = 3  # the append script's status of an action whose user it refused
_DELETED = 4  # ... of an action whose user was deleted (features/store/deletion.py)


def _lua(name: str) -> str:
    """A script of features/store/lua/ (package data: a non-editable install carries them)."""
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


_PRELUDE_LUA = _lua("prelude")
_APPEND_LUA = _lua("append")
_CLAIM_LUA = _lua("claim")
_APPLIED_LUA = _lua("applied")
_MULTI_HMGET_LUA = _lua("multi_hmget")


def _lua_bytes(b: bytes) -> str:
    """A Lua string literal holding arbitrary bytes (decimal escapes)."""
    return '"' + "".join(f"\\{c}" for c in b) + '"'


def build_append_lua(config: OnlineStoreConfig) -> str:
    """The append script with this store's constants (T, n_codes, Feast field names) baked in."""
    fv, pf = enc.USER_STREAM_FV, enc.USER_PROFILE_FV
    subs = {
        "__NC__": str(config.n_codes),
        "__T__": str(config.stream_len),
        "__W__": str(config.seen_window),
        "__B__": str(config.seen_buckets),
        "__TTL_MS__": str(int(config.stream_ttl_s * 1000)),  # features/store/ttl.py
        "__F_TOK__": _lua_bytes(enc.redis_field(fv, "sid_tokens")),
        "__F_ACT__": _lua_bytes(enc.redis_field(fv, "actions")),
        "__F_EID__": _lua_bytes(enc.redis_field(fv, "event_ids")),
        "__F_TIM__": _lua_bytes(enc.redis_field(fv, "event_times_ms")),
        "__F_TS__": _lua_bytes(enc.redis_ts_field(fv)),
        "__P_TS__": _lua_bytes(enc.redis_ts_field(pf)),
        "__P_N__": _lua_bytes(enc.redis_field(pf, "n_actions")),
        "__P_LAST__": _lua_bytes(enc.redis_field(pf, "last_action_ms")),
        # hisam's own bookkeeping fields; Feast reads only the fields it asks for.
        "__M_SEEN_B__": _lua_bytes(redis_meta_field("seen_b")),
        "__SEEN_PREFIX__": _lua_bytes(redis_meta_field("seen:")),
        "__M_LEN__": _lua_bytes(redis_meta_field("len")),
        "__M_MAX__": _lua_bytes(redis_meta_field("max_ms")),
        "__M_TOTAL__": _lua_bytes(redis_meta_field("total")),
        "__M_SIG__": _lua_bytes(redis_meta_field("sig")),
    }
    script = _PRELUDE_LUA + "\n" + _APPLIED_LUA + "\n" + _APPEND_LUA
    for k, v in subs.items():
        script = script.replace(k, v)
    return script


def stream_signature(tok: bytes, act: bytes, eids: bytes, tim: bytes, n: int) -> bytes:
    """The append script's ``signature``: the stream fields' byte lengths and item count."""
    return b"%d:%d:%d:%d:%d" % (len(tok), len(act), len(eids), len(tim), n)


def _applied_spec(applied: Applied | None) -> bytes:
    """The applied record's argument of the scripts (lua/applied.lua): ``topic:partition=offset@ts`` words."""
    return " ".join(f"{t}:{p}={o}@{ts}" for t, p, o, ts in applied_rows(applied)).encode()


def _glob_escape(b: bytes) -> bytes:
    """Bytes matched literally by a Redis glob pattern (SCAN MATCH)."""
    return b"".join(b"\\" + bytes((c,)) if c in b"*?[]\\" else bytes((c,)) for c in b)


class _Credentials:
    """redis-py's credential provider: the user and the password, read for each new connection."""

    def __init__(self, config: OnlineStoreConfig) -> None:
        self._config = config

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        pw = self._config.redis_password()
        if pw is None:
            return ()
        return (self._config.redis_user, pw)


class RedisStreamStore:
    """Appends and direct reads on Feast's Redis layout; thread-safe (a connection pool)."""

    def __init__(self, config: OnlineStoreConfig) -> None:
        import redis

        self.config = config
        self._redis = redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._client = redis.Redis.from_url(
            self.config.redis_url_bare,
            socket_timeout=config.redis_socket_timeout_s,
            socket_connect_timeout=config.redis_connect_timeout_s,
            # redis-py's default retries a timeout with backoff (10 times in redis-py 8),
            # which would stretch the timeout into minutes.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            # ACL login, asked for at each new connection (a rotated password file is read then).
            credential_provider=_Credentials(config),
            **config.redis_tls_kwargs(),
        )
        self._script = build_append_lua(self.config)
        try:
            self._sha = self._client.script_load(self._script)
        except redis.exceptions.AuthenticationError as e:
            raise redis.exceptions.AuthenticationError(
                f"Redis at {config.redis_address} refused user {config.redis_user!r}: wrong password, unknown "
                f'or disabled user ({type(e).__name__}; docs/operations.md "Security: Redis")'
            ) from None
        except redis.exceptions.ResponseError as e:
            if "NOAUTH" not in str(e) and "NOPERM" not in str(e):
                raise
            raise redis.exceptions.AuthenticationError(
                f"Redis at {config.redis_address} needs a login or more rights for user {config.redis_user!r}: {e}"
            ) from None
        except redis.exceptions.ConnectionError as e:
            hint = (
                "TLS: check the CA (--redis-tls-ca) and the client certificate"
                if config.redis_tls
                else ("if the server speaks TLS, use a rediss:// URL")
            )
            raise redis.exceptions.ConnectionError(
                f"cannot talk to Redis at {config.redis_address} ({hint}): {e}"
            ) from e
        # redis-py's Script runs EVALSHA and loads the script again if the server lost it.
        self._mget = self._client.register_script(_MULTI_HMGET_LUA)
        self._claim = self._client.register_script(_PRELUDE_LUA + "\n" + _CLAIM_LUA)
        self._sid_index_key = f"_hisam:{config.project}:item_sids".encode()
        self._layout_key = f"_hisam:{config.project}:layout".encode()
        self._applied_key = f"_hisam:{config.project}:applied".encode()
        self._deleted_key = redis_deleted_key(config.project)
        # Redis Cluster only: the applied record on its own (the append's call holds one user's key)
        self._record_applied = self._client.register_script(
            _APPLIED_LUA + "\ncheck_applied(KEYS[1])\nrecord_applied(KEYS[1], ARGV[1])\nreturn 1"
        )
        fv = enc.USER_STREAM_FV
        self._stream_fields = [enc.redis_field(fv, f) for f in enc.STREAM_FEATURES]
        self._item_fields = [enc.redis_field(enc.ITEM_SID_FV, f) for f in enc.ITEM_FEATURES]
        # Hot-path helpers (per action): a key is a fixed head, the packed id, the project;
        # encoded tokens of an item and decoded item IDs recur from batch to batch.
        self._user_key_head = entity_key_head(enc.USER_ID_KEY)
        self._item_key_head = entity_key_head(enc.ITEM_ID_KEY)
        self._key_tail = config.project.encode("utf-8")
        self._token_varints: dict[tuple[int, ...], bytes] = {}
        self._decoded_items: dict[tuple[int, bytes, bytes | None, bytes | None], ItemSids] = {}

    def _key(self, user_id: int) -> bytes:
        return self._user_key_head + I64.pack(user_id) + self._key_tail

    def _item_key(self, item_id: int) -> bytes:
        return self._item_key_head + I64.pack(item_id) + self._key_tail

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
        actv = enc.varint(a.action)
        ms = int(a.event_time_ms)
        timv = enc.varint(ms)
        ms_str = b"%d" % ms
        ts = enc.timestamp_bytes(ms)
        return b"".join(
            (
                u32(len(eid)), eid, u32(len(tokv)), tokv, u32(len(actv)), actv, u32(len(timv)), timv,
                u32(len(ms_str)), ms_str, u32(len(ts)), ts, b"\x01" if want_history else b"\x00",
            )
        )  # fmt: skip

    def _results(self, reply: list[bytes], keys: Sequence[bytes]) -> list[AppendResult]:
        """The script's reply (see its header) for the actions on ``keys``, as AppendResults."""
        n_codes = self.config.n_codes
        out = []
        for key, st, tok, act in zip(keys, reply[0], reply[1::2], reply[2::2]):
            if st == _DELETED:  # the user was deleted, its grace period not over: nothing written
                out.append(AppendResult(False, b"", b"", n_codes, refused=USER_DELETED, detail=self._describe(key)))
            elif st == _REFUSED:  # tok holds the reason
                detail = f"{self._describe(key)}: {tok.decode('utf-8', 'backslashreplace')}"
                out.append(AppendResult(False, b"", b"", n_codes, refused=CORRUPT_USER_STATE, detail=detail))
            else:
                out.append(AppendResult(st == 1, ints_payload(tok), ints_payload(act), n_codes, resampled=st == 2))
        return out

    def _describe(self, key: bytes) -> str:
        """A user's hash key, printable, with the user id."""
        return f"user {I64.unpack_from(key, len(self._user_key_head))[0]} (Redis key {key!r})"

    def append(self, action: StreamAction, want_history: bool = True) -> AppendResult:
        """Append one action: one EVALSHA round trip, atomic on the server."""
        return self.append_batch([action], want_history)[0]

    def append_batch(
        self,
        actions: Sequence[StreamAction],
        want_history: bool = True,
        applied: Applied | None = None,
    ) -> list[AppendResult]:
        """Append many actions in order, in one round trip.

        Single-node Redis: one EVALSHA over all the batch's keys (the script is atomic as
        a whole). Redis Cluster (``redis_cluster``): one EVALSHA per action, pipelined,
        since a script may only touch keys of one hash slot. The actions of a user whose
        stored state is corrupt come back refused (``CORRUPT_USER_STATE``), nothing written
        for that user; the others are appended.

        ``applied``: (topic, partition) -> the highest source offset the batch applied; the
        applied record (module doc) takes the max, in the same script call (Cluster: after
        every append succeeded). Given with no actions, only the record is written.
        """
        spec = _applied_spec(applied)
        if not actions and not spec:
            return []
        calls = [(self._key(a.user_id), self._record(a, want_history)) for a in actions]
        cluster = self.config.redis_cluster
        # Deleted users (features/store/deletion.py): checked in the script; on a Cluster just before it.
        now = int(time.time() * 1000)
        gone = redis_deleted_keys(self, (k for k, _ in calls), now) if cluster else set()
        groups = [[c] for c in calls if c[0] not in gone] if cluster else [calls]
        tail_keys = [] if cluster else [*([self._applied_key] if spec else []), self._deleted_key]
        tail_args = [b"", b""] if cluster else [spec, b"%d" % now]
        for attempt in (0, 1):
            pipe = self._client.pipeline(transaction=False)
            for group in groups:
                keys = [*(k for k, _ in group), *tail_keys]
                pipe.evalsha(self._sha, len(keys), *keys, b"".join(r for _, r in group), *tail_args)
            replies = pipe.execute(raise_on_error=False) if groups else []
            if attempt == 0 and any(isinstance(r, self._redis.exceptions.NoScriptError) for r in replies):
                # Only a server that lost its scripts raises this, and then for every
                # call: none of them ran, so re-running the batch appends nothing twice.
                self._sha = self._client.script_load(self._script)
                continue
            break
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise OnlineStoreError(f"{len(errors)} of {len(groups)} append calls failed; first: {errors[0]}")
        if spec and cluster:
            try:
                self._record_applied(keys=[self._applied_key], args=[spec])
            except self._redis.exceptions.ResponseError as e:
                raise OnlineStoreError(f"the applied record was not written: {e}") from e
        live = iter([r for group, reply in zip(groups, replies) for r in self._results(reply, [k for k, _ in group])])
        results = [self._results([b"\x04", b"", b""], [k])[0] if k in gone else next(live) for k, _ in calls]
        refused = {k: r.detail for (k, _), r in zip(calls, results) if r.refused == CORRUPT_USER_STATE}
        for detail in refused.values():
            log.warning("online store: corrupt state of %s; its actions were refused, nothing written for it", detail)
        return results

    def applied_offsets(self, topic: str) -> dict[int, AppliedOffset]:
        """The applied record of ``topic``: partition -> the highest source offset a batch applied."""
        head = f"{topic}:".encode()
        out = {}
        for f, v in self._client.hgetall(self._applied_key).items():
            off, _, ts = v.partition(b"@")
            if f.startswith(head) and f[len(head) :].isdigit() and off.isdigit():
                out[int(f[len(head) :])] = AppliedOffset(int(off), int(ts) if ts.lstrip(b"-").isdigit() else -1)
        return out

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]:
        """Direct read (one pipelined HMGET round trip); None for a user with no stream."""
        pipe = self._client.pipeline(transaction=False)
        for u in user_ids:
            pipe.hmget(self._key(u), self._stream_fields)
        return [decode_user_stream(u, raw, self.config.n_codes) for u, raw in zip(user_ids, pipe.execute())]

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

    def _item_rows(self, keys: list[bytes], fields: list[bytes]) -> list[list[bytes | None]]:
        """The three item fields of every key (absent: None)."""
        if self.config.redis_cluster:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(k, fields)
            return pipe.execute()
        # One command and one flat reply: far less client-side parsing than N HMGETs.
        blob = self._mget(keys=keys, args=fields)
        rows, pos = [], 0
        for _ in keys:
            row = []
            for _ in range(3):
                (n,) = _U32.unpack_from(blob, pos)
                row.append(blob[pos + 4 : pos + 4 + n] or None)
                pos += 4 + n
            rows.append(row)
        return rows

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]:
        """Semantic IDs of the known items among ``item_ids`` (unknown ones are absent)."""
        from google.protobuf.timestamp_pb2 import Timestamp

        keys = [self._item_key(i) for i in item_ids]
        if not keys:
            return {}
        rows = self._item_rows(keys, [*self._item_fields, enc.redis_ts_field(enc.ITEM_SID_FV)])
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

    def claim_layout(self) -> None:
        """Record this store's layout (n_codes, T) the first time; raise OnlineStoreError on another.

        The record is the string key ``_hisam:<project>:layout``, set only where absent (so
        of two workers starting at once, the first one's layout stands).
        """
        self._client.set(self._layout_key, layout_record(self.config), nx=True)
        stored = self._client.get(self._layout_key)
        check_layout(stored, self.config, f"Redis key {self._layout_key.decode()!r}")

    def close(self) -> None:
        self._client.close()

    # Whole-namespace access for re-tokenisation (stream/retokenize/): not the hot path.

    def entity_ids(self, join_key: str = enc.USER_ID_KEY, scan_count: int = 1000) -> np.ndarray:
        """Ids of every entity of ``join_key`` stored under this project, sorted (int64).

        SCAN with a pattern that matches exactly Feast's key layout for this project (entity
        key header, any 8 value bytes, the project name), so another project's keys, even
        one whose name ends like this one, are never matched.
        """
        head = entity_key_head(join_key)
        pattern = _glob_escape(head) + b"?" * 8 + _glob_escape(self.config.project.encode())
        ids = [I64.unpack_from(k, len(head))[0] for k in self._client.scan_iter(match=pattern, count=scan_count)]
        return np.unique(np.asarray(ids, np.int64))

    def read_user_states(self, user_ids: Sequence[int]) -> list[UserState | None]:
        """Users' streams with their seen windows and profile counters (pipelined round trips).

        A stream written through Feast has no window and no bookkeeping fields: its ids
        count as seen (as the append script counts them) and its counters come from the
        profile view, or from the stream itself.
        """
        nb = self.config.seen_buckets
        pf = enc.USER_PROFILE_FV
        meta = [
            *(redis_meta_field(n) for n in ("total", "max_ms", "seen_b")),
            enc.redis_field(pf, "n_actions"),
            enc.redis_field(pf, "last_action_ms"),
        ]
        head = len(self._stream_fields) + len(meta)  # the bucket fields follow
        seen_b_at = len(self._stream_fields) + 2
        fields = [*self._stream_fields, *meta, *seen_bucket_fields(nb)]
        pipe = self._client.pipeline(transaction=False)
        for u in user_ids:
            pipe.hmget(self._key(u), fields)
        rows = pipe.execute()
        # A window in buckets of another count (W changed): read those buckets instead.
        other = {
            i: int(raw[seen_b_at])
            for i, raw in enumerate(rows)
            if raw[seen_b_at] is not None and int(raw[seen_b_at]) != nb
        }
        if other:
            pipe = self._client.pipeline(transaction=False)
            for i, b in other.items():
                pipe.hmget(self._key(user_ids[i]), seen_bucket_fields(b))
            for i, got in zip(other, pipe.execute()):
                rows[i] = [*rows[i][:head], *got]
        out: list[UserState | None] = []
        for u, raw in zip(user_ids, rows):
            stream = decode_user_stream(u, raw[:4], self.config.n_codes)
            if stream is None:
                out.append(None)
                continue
            total, max_ms, seen_b, p_n, p_last = raw[4:head]
            if total is not None:
                n_actions = int(total)
            elif p_n is not None:
                n_actions = enc.decode_value(p_n).int64_val
            else:
                n_actions = len(stream)
            if seen_b is not None:
                recs = [r for b in raw[head:] if b for r in seen_records(b)]
                recs.sort(key=lambda r: r[1])
                seen_ids = [e for e, seq in recs if seq > int(total or 0) - self.config.seen_window]
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
        len_f, max_f, total_f, seen_b_f, sig_f = (
            redis_meta_field(n) for n in ("len", "max_ms", "total", "seen_b", "sig")
        )
        nb = self.config.seen_buckets
        bucket_fields = seen_bucket_fields(nb)
        pipe = self._client.pipeline(transaction=False)
        for st in states:
            st.check(self.config)
            s = st.stream
            ts = enc.timestamp_bytes(st.last_action_ms)
            values = (
                enc.int64_list_value(s.tokens.ravel().tolist()),
                enc.int64_list_value(s.actions.tolist()),
                enc.string_list_value(s.event_ids),
                enc.int64_list_value(s.event_times_ms.tolist()),
            )
            mapping = {
                **dict(zip(self._stream_fields, values)),
                sig_f: stream_signature(*values, len(s)),
                enc.redis_ts_field(fv): ts,
                enc.redis_field(pf, "n_actions"): enc.int64_value(st.n_actions),
                enc.redis_field(pf, "last_action_ms"): enc.int64_value(st.last_action_ms),
                enc.redis_ts_field(pf): ts,
                len_f: str(len(s)),
                max_f: str(int(st.last_action_ms)),
                total_f: str(int(st.n_actions)),
                seen_b_f: str(nb),
            }
            buckets = seen_bucket_values(st.seen_ids, st.n_actions, nb)
            mapping.update({bucket_fields[b]: v for b, v in buckets.items()})
            key = self._key(s.user_id)
            stale = [f for b, f in enumerate(bucket_fields) if b not in buckets]
            if stale:
                pipe.hdel(key, *stale)
            pipe.hset(key, mapping=mapping)
            if self.config.stream_ttl_s > 0:  # features/store/ttl.py
                pipe.pexpire(key, int(self.config.stream_ttl_s * 1000))
        pipe.execute()
