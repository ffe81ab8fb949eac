"""The system under test as the bench runs it: topics, a stream worker process under a tiny
restart loop (every exit is counted: there must be none), and the direct corruption of users'
stored state in Redis or SQLite (Feast's layout, written around the store's own code)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from features import encoding as enc
from stream import topics as tp
from stream.testing import WorkerProcess

log = logging.getLogger(__name__)

# Topics that take hostile records: they accept records up to this size (Kafka's topic config
# max.message.bytes), so that 1-2 MB records reach the worker. The embedded broker's own limit
# (message.max.bytes) refuses anything over ~1 MiB; a production topic may well allow more.
BIG_TOPIC_BYTES = 4 << 20
UNKNOWN_ITEM_RETRY_S = 0.5
UNKNOWN_ITEM_MAX_AGE_S = 8.0


def topics(app_id: str) -> list[tp.TopicSpec]:
    big = {"max.message.bytes": str(BIG_TOPIC_BYTES)}
    out = []
    for s in tp.default_topics(4, samples_retention_ms=5_000, app_id=app_id):
        if s.name in (tp.USER_ACTIONS, tp.ITEM_EVENTS):
            s = tp.TopicSpec(s.name, s.partitions, s.replication, {**s.configs, **big})
        out.append(s)
    return out


@dataclass
class Exit:
    status: int
    log_tail: str


@dataclass
class SupervisedWorker:
    """``python -m hisam.jobs.stream_worker`` restarted whenever it exits; ``exits`` records each exit."""

    args: list[str]
    log_path: Path
    exits: list[Exit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.worker = WorkerProcess(self.args, self.log_path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-restarts", daemon=True)

    def start(self) -> None:
        self.worker.start()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            proc = self.worker.proc
            if proc is not None and proc.poll() is not None and not self._stop.is_set():
                tail = self.worker.log_tail(4000)
                self.exits.append(Exit(proc.returncode, tail))
                log.error("the stream worker exited with %d; restarting it. Its log ends:\n%s", proc.returncode, tail)
                time.sleep(1.0)
                self.worker.start()
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.worker.stop()

    def log_errors(self) -> list[str]:
        """The worker log's ERROR and CRITICAL lines and tracebacks (dead letters are WARNINGs)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        marks = (" ERROR ", " CRITICAL ", "[ERROR]", "[CRITICAL]", "Traceback")
        return [line for line in text.splitlines() if any(m in line for m in marks)]


def worker_args(bootstrap: str, cfg, app_id: str, tokenizer: Path) -> list[str]:
    args = [
        "--bootstrap", bootstrap, "--backend", cfg.backend, "--repo-dir", str(cfg.repo_dir),
        "--stream-len", str(cfg.stream_len), "--n-codes", str(cfg.n_codes), "--seen-window", str(cfg.seen_window),
        "--app-id", app_id, "--instance-id", app_id, "--within-ms", "5", "--tokenizer", str(tokenizer),
        "--unknown-item-retry", str(UNKNOWN_ITEM_RETRY_S), "--unknown-item-max-age", str(UNKNOWN_ITEM_MAX_AGE_S),
    ]  # fmt: skip
    if cfg.redis_url:
        args += ["--redis-url", cfg.redis_url]
    return args


# ---- corrupting a user's stored state, directly in the database ----------------------------------

CORRUPTIONS = ("garbage_field", "truncated_list", "foreign_value", "wrong_type")


def corrupt_user(cfg, user: int, how: str) -> None:
    """Damage ``user``'s stored stream in the store's database, bypassing the store's code."""
    (_corrupt_redis if cfg.backend == "redis" else _corrupt_sqlite)(cfg, user, how)


def _corrupt_redis(cfg, user: int, how: str) -> None:
    import redis

    c = redis.Redis.from_url(cfg.redis_url)
    try:
        key = enc.redis_key(cfg.project, enc.USER_ID_KEY, user)
        fld = {f: enc.redis_field(enc.USER_STREAM_FV, f) for f in enc.STREAM_FEATURES}
        if not c.exists(key):
            raise RuntimeError(f"user {user} has no stored state to corrupt")
        if how == "garbage_field":
            c.hset(key, fld["sid_tokens"], b"\xde\xad\xbe\xef")
        elif how == "truncated_list":
            c.hset(key, fld["event_times_ms"], c.hget(key, fld["event_times_ms"])[:-1])
        elif how == "foreign_value":
            c.hset(key, fld["actions"], enc.string_list_value(["x", "y"]))
        elif how == "wrong_type":
            c.delete(key)
            c.set(key, b"a string where the user's hash belongs")
        else:
            raise ValueError(how)
    finally:
        c.close()


def _corrupt_sqlite(cfg, user: int, how: str) -> None:
    conn = sqlite3.connect(str(cfg.sqlite_db), timeout=30.0)
    try:
        table = enc.sqlite_table(cfg.project, enc.USER_STREAM_FV)
        ek = enc.entity_key_bytes(enc.USER_ID_KEY, user)

        def get(name: str) -> bytes:
            row = conn.execute(
                f'SELECT value FROM "{table}" WHERE entity_key = ? AND feature_name = ?', (ek, name)
            ).fetchone()
            if row is None:
                raise RuntimeError(f"user {user} has no stored {name} to corrupt")
            return row[0]

        def put(name: str, value) -> None:
            conn.execute(f'UPDATE "{table}" SET value = ? WHERE entity_key = ? AND feature_name = ?', (value, ek, name))

        if how == "garbage_field":
            get("sid_tokens")
            put("sid_tokens", b"\xde\xad\xbe\xef")
        elif how == "truncated_list":
            put("event_times_ms", get("event_times_ms")[:-1])
        elif how == "foreign_value":
            get("actions")
            put("actions", enc.string_list_value(["x", "y"]))
        elif how == "wrong_type":
            get("sid_tokens")
            put("sid_tokens", "not a value")
        else:
            raise ValueError(how)
        conn.commit()
    finally:
        conn.close()
