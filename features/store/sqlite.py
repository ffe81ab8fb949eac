"""The SQLite store: appends in one ``BEGIN IMMEDIATE`` transaction, against Feast's table layout.

SQLite's write lock serialises concurrent writers. The seen window is a side table
``{project}_hisam_seen`` (one row per remembered id, with the per-user sequence number
that orders eviction), written in the append's transaction; it is not a Feast table.

Per-user isolation: a user whose stored rows are not in this layout (a Value that does not
decode, of another type, stream lists of mismatched lengths, a window row of another type)
is refused: its actions come back ``refused=CORRUPT_USER_STATE`` with the entity key and
what is wrong, nothing is written for it, and the other users are written in the same
transaction. As in Redis, nothing else remembers a refused user: its later actions are
checked, and refused, again. ``claim_layout`` records n_codes and T in the side table
``{project}_hisam_meta``. The applied record (``append_batch``'s ``applied``,
``applied_offsets``) is the side table ``{project}_hisam_applied``: (topic, partition) ->
the highest source offset a batch applied (and its record's timestamp), max(old, new),
written in the batch's transaction. Deleted users and the optional TTL: ``deletion.py``, ``ttl.py``.

One connection per thread (SQLite connections are not shareable); Feast's own SQLite
store must likewise stay on one thread.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from features import encoding as enc
from features.store.base import (
    I64,
    Applied,
    applied_rows,
    check_layout,
    decode_user_stream,
    entity_key_head,
    layout_record,
)
from features.store.config import OnlineStoreConfig
from features.store.markers import SQLITE_DELETED_DDL, sqlite_deleted_among, sqlite_deleted_table
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
from features.store.ttl import SQLITE_EXPIRY_DDL, sqlite_expiry_table, sqlite_purge_expired, sqlite_touch, ttl_ms

log = logging.getLogger(__name__)

_FEAST_SQLITE_DDL = (
    # Feast 0.67's own DDL (feast/infra/online_stores/sqlite.py, update()); creating it
    # here lets the stream run before `apply`, and Feast's CREATE ... IF NOT EXISTS is
    # then a no-op.
    'CREATE TABLE IF NOT EXISTS "{t}" (entity_key BLOB, feature_name TEXT, value BLOB, value_text TEXT, '
    "vector_value BLOB, event_ts timestamp, created_ts timestamp, PRIMARY KEY(entity_key, feature_name))"
)

# The seen window: one row per remembered event id; ``seq`` is the user's
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

# hisam's own bookkeeping of the namespace (``claim_layout``): name -> value. Not a Feast table.
_META_DDL = 'CREATE TABLE IF NOT EXISTS "{t}" (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID'

# What the appends applied (``applied_offsets``): per source partition, the highest offset and
# its record's timestamp (ms, -1: unknown). Not a Feast table. SET reads the old row's values.
_APPLIED_DDL = (
    'CREATE TABLE IF NOT EXISTS "{t}" (topic TEXT NOT NULL, part INTEGER NOT NULL, applied INTEGER NOT NULL, '
    "ts INTEGER NOT NULL, PRIMARY KEY(topic, part)) WITHOUT ROWID"
)
_APPLIED_UPSERT = (
    'INSERT INTO "{t}" (topic, part, applied, ts) VALUES (?, ?, ?, ?) ON CONFLICT(topic, part) DO UPDATE SET '
    "ts = CASE WHEN excluded.applied > applied THEN excluded.ts ELSE ts END, applied = max(applied, excluded.applied)"
)

# The Value type each user feature must have (an absent row has none).
_KINDS = {
    "sid_tokens": "int64_list_val",
    "actions": "int64_list_val",
    "event_ids": "string_list_val",
    "event_times_ms": "int64_list_val",
    "n_actions": "int64_val",
    "last_action_ms": "int64_val",
}


class _CorruptUser(Exception):
    """A user's stored rows are not in the store's layout (the message says what is wrong)."""


# What a user's unreadable stored state can raise while it is loaded or appended to: the
# user is refused. Anything else (sqlite3.Error above all: the database, not the data)
# fails the batch.
_USER_FAULTS = (_CorruptUser, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


# Feast's row of one (entity, feature): written whole, replacing the previous value.
_UPSERT = (
    'INSERT INTO "{t}" (entity_key, feature_name, value, event_ts, created_ts) VALUES (?, ?, ?, ?, ?) '
    "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
    "event_ts = excluded.event_ts, created_ts = excluded.created_ts"
)

_MAX_PARAMS = 500  # keys per IN (...) query: SQLite caps bound parameters


def _upsert(conn: sqlite3.Connection, table: str, rows: Sequence[tuple]) -> None:
    """Write Feast rows ``(entity_key, feature_name, value, event_ts, created_ts)`` into ``table``."""
    conn.executemany(_UPSERT.format(t=table), rows)


def _select_in(conn: sqlite3.Connection, columns: str, table: str, keys: Sequence[bytes]) -> Iterator[tuple]:
    """``SELECT columns FROM table WHERE entity_key IN keys``, in chunks SQLite accepts."""
    for start in range(0, len(keys), _MAX_PARAMS):
        chunk = keys[start : start + _MAX_PARAMS]
        yield from conn.execute(
            f'SELECT {columns} FROM "{table}" WHERE entity_key IN ({",".join("?" * len(chunk))})', chunk
        )


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (the write lock, taken up front) ... ``COMMIT``; rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _stream_rows(
    ek: bytes, ts: int, tokens: list[int], actions: list[int], event_ids: list[str], times: list[int]
) -> list[tuple]:
    """The user_stream view's rows of one user."""
    return [
        (ek, "sid_tokens", enc.int64_list_value(tokens), ts, ts),
        (ek, "actions", enc.int64_list_value(actions), ts, ts),
        (ek, "event_ids", enc.string_list_value(event_ids), ts, ts),
        (ek, "event_times_ms", enc.int64_list_value(times), ts, ts),
    ]


def _profile_rows(ek: bytes, ts: int, n_actions: int, last_action_ms: int) -> list[tuple]:
    """The user_profile view's rows of one user."""
    return [
        (ek, "n_actions", enc.int64_value(n_actions), ts, ts),
        (ek, "last_action_ms", enc.int64_value(last_action_ms), ts, ts),
    ]


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
        self._meta_t = f"{config.project}_hisam_meta"
        self._applied_t = f"{config.project}_hisam_applied"
        w = f'FROM "{self._seen_t}" WHERE entity_key = ?1 ORDER BY'
        self._seen_types_q = (
            f"SELECT (SELECT typeof(seq) {w} seq DESC LIMIT 1), (SELECT typeof(event_id) {w} event_id LIMIT 1), "
            f"(SELECT typeof(event_id) {w} event_id DESC LIMIT 1)"
        )
        config.sqlite_db.parent.mkdir(parents=True, exist_ok=True)
        conn = self._conn()
        for t in (self._stream_t, self._profile_t, self._item_t):
            conn.execute(_FEAST_SQLITE_DDL.format(t=t))
        for ddl in _SEEN_DDL:
            conn.execute(ddl.format(t=self._seen_t))
        conn.execute(_SID_DDL.format(t=self._sid_t))
        conn.execute(_META_DDL.format(t=self._meta_t))
        conn.execute(_APPLIED_DDL.format(t=self._applied_t))
        for ddl in SQLITE_DELETED_DDL:  # deleted users in their grace period (features/store/deletion.py)
            conn.execute(ddl.format(t=sqlite_deleted_table(config.project)))
        for ddl in SQLITE_EXPIRY_DDL:  # the optional TTL (features/store/ttl.py)
            conn.execute(ddl.format(t=sqlite_expiry_table(config.project)))

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

    def _values(self, table: str, rows: dict[str, object]) -> dict[str, enc.OnlineValue]:
        """A user's stored Values of one view, each decoded and of its feature's type (else _CorruptUser)."""
        out = {}
        for name, raw in rows.items():
            if name not in _KINDS:
                continue  # a feature hisam does not read
            if raw is not None and not isinstance(raw, bytes):
                raise _CorruptUser(f"{table}.{name} holds a {type(raw).__name__}, not a Value")
            try:
                v = enc.decode_value(raw)
            except Exception as e:  # protobuf's DecodeError
                raise _CorruptUser(f"{table}.{name} does not decode: {e}") from e
            if v.WhichOneof("val") not in (_KINDS[name], None):
                raise _CorruptUser(f"{table}.{name} is a {v.WhichOneof('val')} Value, not a {_KINDS[name]}")
            out[name] = v
        return out

    def _load(self, conn: sqlite3.Connection, user_id: int) -> _SqliteUser:
        """A user's stored state, checked (raises _CorruptUser; writes nothing before the checks pass)."""
        ek = enc.entity_key_bytes(enc.USER_ID_KEY, user_id)
        q = 'SELECT feature_name, value FROM "{t}" WHERE entity_key = ?'
        rows = self._values(self._stream_t, dict(conn.execute(q.format(t=self._stream_t), (ek,))))
        prof = self._values(self._profile_t, dict(conn.execute(q.format(t=self._profile_t), (ek,))))
        empty = enc.OnlineValue()
        last = prof.get("last_action_ms", empty)
        s = _SqliteUser(
            key=ek,
            tokens=list(rows.get("sid_tokens", empty).int64_list_val.val),
            actions=list(rows.get("actions", empty).int64_list_val.val),
            event_ids=list(rows.get("event_ids", empty).string_list_val.val),
            times=list(rows.get("event_times_ms", empty).int64_list_val.val),
            n_actions=prof.get("n_actions", empty).int64_val,
            last_ms=last.int64_val if last.HasField("int64_val") else None,
        )
        n = len(s.event_ids)
        if len(s.tokens) != n * self.config.n_codes or len(s.actions) != n or len(s.times) != n:
            raise _CorruptUser(
                f"{self._stream_t} holds {n} event ids, {len(s.actions)} actions, {len(s.times)} times and "
                f"{len(s.tokens)} tokens (the store keeps {self.config.n_codes} per item)"
            )
        # The window's rows: SQLite orders values integer < text < blob, so the extremes of
        # the (entity_key, seq) index and of the primary key show a row of another type (one
        # indexed look-up each, not a scan of the window).
        seq_t, eid_lo, eid_hi = conn.execute(self._seen_types_q, (ek,)).fetchone()
        if seq_t not in (None, "integer") or eid_lo not in (None, "text") or eid_hi not in (None, "text"):
            raise _CorruptUser(f"{self._seen_t} holds a row whose event_id or seq is not text and integer")
        if s.event_ids and seq_t is None:
            # A stream written through Feast (which keeps no window): its ids start the window.
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
            if seq is not None and not isinstance(seq, int):
                raise _CorruptUser(f"{self._seen_t} holds seq {seq!r} for event {event_id!r}, not an integer")
        return seq is not None and seq > s.n_actions - self.config.seen_window

    def _save(self, conn: sqlite3.Connection, s: _SqliteUser) -> None:
        ek = s.key
        ts = enc.sqlite_timestamp(s.last_ms or 0)
        _upsert(conn, self._stream_t, _stream_rows(ek, ts, s.tokens, s.actions, s.event_ids, s.times))
        _upsert(conn, self._profile_t, _profile_rows(ek, ts, s.n_actions, s.last_ms or 0))
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

    def append_batch(
        self,
        actions: Sequence[StreamAction],
        want_history: bool = True,
        applied: Applied | None = None,
    ) -> list[AppendResult]:
        """Append many actions in order, in one write transaction.

        The actions of a user whose stored rows are corrupt come back refused
        (``CORRUPT_USER_STATE``), nothing written for that user; the others are written.
        ``applied``: (topic, partition) -> the highest source offset the batch applied; the
        applied record takes the max, in the same transaction (rolled back with it).
        """
        for a in actions:
            a.validate(self.config.n_codes)
        rows = applied_rows(applied)
        if not actions and not rows:
            return []
        conn = self._conn()

        def refusal(detail: str) -> AppendResult:
            return AppendResult(False, b"", b"", self.config.n_codes, refused=CORRUPT_USER_STATE, detail=detail)

        ttl = ttl_ms(self.config)
        with _write_transaction(conn):
            conn.executemany(_APPLIED_UPSERT.format(t=self._applied_t), rows)
            if ttl:  # users past their TTL go first (features/store/ttl.py)
                sqlite_purge_expired(conn, self.config.project, (self._stream_t, self._profile_t, self._seen_t))
            users: dict[int, _SqliteUser] = {}
            refused: dict[int, str] = {}  # user -> what is wrong with its stored state
            at: dict[int, list[int]] = {}  # user -> its actions' positions in results
            results: list[AppendResult] = []
            gone = sqlite_deleted_among(conn, self.config.project, (a.user_id for a in actions), int(time.time() * 1e3))
            for a in actions:
                u = a.user_id
                if u in gone:  # deleted, its grace period not over: dropped, nothing written
                    results.append(AppendResult(False, b"", b"", self.config.n_codes, refused=USER_DELETED))
                    continue
                at.setdefault(u, []).append(len(results))
                if u not in users and u not in refused:
                    try:
                        users[u] = self._load(conn, u)
                    except _USER_FAULTS as e:  # not sqlite3.Error: the database's fault fails the batch
                        refused[u] = self._describe(u, e)
                if u in users:
                    try:
                        results.append(self._apply(conn, users[u], a, want_history))
                        continue
                    except _USER_FAULTS as e:  # unforeseen by _load's checks; nothing is saved for u
                        refused[u] = self._describe(u, e)
                        del users[u]
                        for i in at[u][:-1]:
                            results[i] = refusal(refused[u])
                results.append(refusal(refused[u]))
            for s in users.values():
                if s.dirty:
                    self._save(conn, s)
            sqlite_touch(conn, self.config.project, ttl, [s.key for s in users.values() if s.dirty])
        for detail in refused.values():
            log.warning("online store: corrupt state of %s; its actions were refused, nothing written for it", detail)
        return results

    def applied_offsets(self, topic: str) -> dict[int, AppliedOffset]:
        """The applied record of ``topic``: partition -> the highest source offset a batch applied."""
        q = f'SELECT part, applied, ts FROM "{self._applied_t}" WHERE topic = ?'
        return {int(p): AppliedOffset(int(o), int(ts)) for p, o, ts in self._conn().execute(q, (topic,))}

    def _describe(self, user_id: int, e: Exception) -> str:
        """A refused user's entity key, printable, with what is wrong."""
        ek = enc.entity_key_bytes(enc.USER_ID_KEY, user_id)
        what = str(e) if isinstance(e, _CorruptUser) else f"unexpected {type(e).__name__}: {e}"
        return f"user {user_id} (SQLite entity_key {ek!r}): {what}"

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]:
        """Direct read of the users' streams (one query); None for a user with no stream."""
        keys = [enc.entity_key_bytes(enc.USER_ID_KEY, u) for u in user_ids]
        by_key: dict[bytes, dict[str, bytes]] = {}
        for ek, name, value in _select_in(self._conn(), "entity_key, feature_name, value", self._stream_t, keys):
            by_key.setdefault(ek, {})[name] = value
        out = []
        for u, ek in zip(user_ids, keys):
            row = by_key.get(ek)
            out.append(
                None
                if row is None
                else decode_user_stream(u, [row.get(f) for f in enc.STREAM_FEATURES], self.config.n_codes)
            )
        return out

    def put_item_sids(self, items: Sequence[ItemSids]) -> None:
        rows = []
        for it in items:
            ek = enc.entity_key_bytes(enc.ITEM_ID_KEY, it.item_id)
            ts = enc.sqlite_timestamp(it.event_time_ms)
            rows.append((ek, "sid_tokens", enc.int64_list_value(it.tokens), ts, ts))
            rows.append((ek, "tokenizer_version", enc.string_value(it.tokenizer_version), ts, ts))
        conn = self._conn()
        with _write_transaction(conn):
            _upsert(conn, self._item_t, rows)

    def claim_item_sids(self, claims: Sequence[SidClaim]) -> list[tuple[int, ...] | None]:
        """As ``RedisStreamStore.claim_item_sids``, in one ``BEGIN IMMEDIATE`` transaction."""
        if not claims:
            return []
        conn = self._conn()
        t = self._sid_t
        out: list[tuple[int, ...] | None] = []
        with _write_transaction(conn):
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
        return out

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]:
        """Semantic IDs of the known items among ``item_ids`` (unknown ones are absent)."""
        keys = {enc.entity_key_bytes(enc.ITEM_ID_KEY, i): int(i) for i in item_ids}
        rows: dict[int, dict[str, tuple[bytes, int]]] = {}
        columns = "entity_key, feature_name, value, event_ts"
        for ek, name, value, ts in _select_in(self._conn(), columns, self._item_t, list(keys)):
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

    def claim_layout(self) -> None:
        """Record this store's layout (n_codes, T) the first time; raise OnlineStoreError on another.

        The record is the row ``layout`` of ``{project}_hisam_meta``, inserted only where
        absent, in a write transaction (of two workers starting at once, the first one's stands).
        """
        conn = self._conn()
        with _write_transaction(conn):
            conn.execute(
                f'INSERT OR IGNORE INTO "{self._meta_t}" (name, value) VALUES (?, ?)',
                ("layout", layout_record(self.config)),
            )
            (stored,) = conn.execute(f'SELECT value FROM "{self._meta_t}" WHERE name = ?', ("layout",)).fetchone()
        check_layout(stored, self.config, f"table {self._meta_t} of {self.config.sqlite_db}")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # Whole-namespace access for re-tokenisation (stream/retokenize/): not the hot path.

    def entity_ids(self, join_key: str = enc.USER_ID_KEY) -> np.ndarray:
        """Ids of every entity of ``join_key`` stored under this project, sorted (int64)."""
        tables = {enc.USER_ID_KEY: self._stream_t, enc.ITEM_ID_KEY: self._item_t}
        if join_key not in tables:
            raise ValueError(f"join_key must be one of {sorted(tables)}, got {join_key!r}")
        head = entity_key_head(join_key)
        rows = self._conn().execute(f'SELECT DISTINCT entity_key FROM "{tables[join_key]}"')
        ids = [I64.unpack_from(ek, len(head))[0] for (ek,) in rows if len(ek) == len(head) + 8 and ek.startswith(head)]
        return np.unique(np.asarray(ids, np.int64))

    def read_user_states(self, user_ids: Sequence[int]) -> list[UserState | None]:
        """Users' streams with their seen windows and profile counters (read only)."""
        conn = self._conn()
        streams = self.read_streams(user_ids)
        keys = [enc.entity_key_bytes(enc.USER_ID_KEY, u) for u in user_ids]
        prof: dict[bytes, dict[str, bytes]] = {}
        for ek, name, value in _select_in(conn, "entity_key, feature_name, value", self._profile_t, keys):
            prof.setdefault(ek, {})[name] = value
        seen: dict[bytes, list[tuple[int, str]]] = {}
        for ek, seq, eid in _select_in(conn, "entity_key, seq, event_id", self._seen_t, keys):
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
            # written through Feast, whose ids start the window (see _load).
            ids = [e for q, e in rows if q > n_actions - self.config.seen_window] if rows else list(s.event_ids)
            out.append(UserState(s, ids, n_actions, last_ms))
        return out

    def write_user_states(self, states: Sequence[UserState]) -> None:
        """Write whole user states (stream, seen window, counters) in one transaction, replacing them.

        For filling a namespace no stream worker writes to (re-tokenisation). The rows are
        those an append writes; the window's ids get consecutive sequence numbers ending at
        ``n_actions``, as appends give them.
        """
        stream_rows, profile_rows, seen_rows, keys = [], [], [], []
        for st in states:
            st.check(self.config)
            s = st.stream
            ek = enc.entity_key_bytes(enc.USER_ID_KEY, s.user_id)
            ts = enc.sqlite_timestamp(st.last_action_ms)
            keys.append((ek,))
            stream_rows += _stream_rows(
                ek, ts, s.tokens.ravel().tolist(), s.actions.tolist(), s.event_ids, s.event_times_ms.tolist()
            )
            profile_rows += _profile_rows(ek, ts, st.n_actions, st.last_action_ms)
            first = st.n_actions - len(st.seen_ids) + 1
            seen_rows += [(ek, e, first + i) for i, e in enumerate(st.seen_ids)]
        conn = self._conn()
        with _write_transaction(conn):
            _upsert(conn, self._stream_t, stream_rows)
            _upsert(conn, self._profile_t, profile_rows)
            conn.executemany(f'DELETE FROM "{self._seen_t}" WHERE entity_key = ?', keys)
            conn.executemany(f'INSERT INTO "{self._seen_t}" (entity_key, event_id, seq) VALUES (?, ?, ?)', seen_rows)
            sqlite_touch(conn, self.config.project, ttl_ms(self.config), [k for (k,) in keys])
