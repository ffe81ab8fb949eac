"""Optional TTL of users' state (``OnlineStoreConfig.stream_ttl_s``): a user with no append for that long is gone.

Everything of the user goes (stream, profile counters, seen window), as a deletion would take
it, but without a marker: its next action starts a new history. The clock is the store
writer's at the user's last append (not the actions' event times, which a replay sets years
back).

* Redis: the append script (and ``write_user_states``) sets the user's hash to expire
  ``stream_ttl_s`` after each write (PEXPIRE), so Redis removes it by itself, and no read
  sees it after that.
* SQLite: each write records the user's expiry in ``<project>_hisam_expiry`` (entity key ->
  epoch ms), and every append transaction first removes the users whose expiry has passed
  (their rows of the stream, profile, seen-window and expiry tables; at most
  ``PURGE_BATCH`` users a transaction). So on SQLite an expired user disappears with the
  next batch a worker appends, not at the instant (an idle worker leaves it until then).

The TTL bounds how long a silent user's history is kept; it must exceed the longest time a
user's action may be redelivered, since the seen window expires with the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

SQLITE_EXPIRY_DDL = (
    'CREATE TABLE IF NOT EXISTS "{t}" (entity_key BLOB PRIMARY KEY, expires_ms INTEGER NOT NULL) WITHOUT ROWID',
    'CREATE INDEX IF NOT EXISTS "{t}_by_expiry" ON "{t}" (expires_ms)',
)
PURGE_BATCH = 1000


def sqlite_expiry_table(project: str) -> str:
    return f"{project}_hisam_expiry"


def ttl_ms(config) -> int:
    return int(config.stream_ttl_s * 1000)


def sqlite_touch(conn, project: str, ttl: int, keys: Iterable[bytes], now: int | None = None) -> None:
    """Record that the users of ``keys`` were written now (in the caller's transaction); no TTL: nothing."""
    if ttl <= 0:
        return
    now = int(time.time() * 1000) if now is None else now
    conn.executemany(
        f'INSERT OR REPLACE INTO "{sqlite_expiry_table(project)}" (entity_key, expires_ms) VALUES (?, ?)',
        [(k, now + ttl) for k in keys],
    )


def sqlite_purge_expired(conn, project: str, tables: Iterable[str], now: int | None = None) -> int:
    """Remove the users whose expiry passed (in the caller's transaction): their rows of ``tables``
    and of the expiry table. Returns how many."""
    t = sqlite_expiry_table(project)
    now = int(time.time() * 1000) if now is None else now
    keys = [
        (k,) for (k,) in conn.execute(f'SELECT entity_key FROM "{t}" WHERE expires_ms <= ? LIMIT ?', (now, PURGE_BATCH))
    ]
    if keys:
        for table in (*tables, t):
            conn.executemany(f'DELETE FROM "{table}" WHERE entity_key = ?', keys)
    return len(keys)
