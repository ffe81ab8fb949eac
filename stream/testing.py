"""Helpers for tests and benchmarks that drive a real stream worker process.

Like ``recipes.tokenizer.testing``: small, real pieces (a worker subprocess that can be
killed with SIGKILL, polling with a deadline, reading a topic from the beginning), kept
in the package so that tests and ``hisam bench stream`` share them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.supervisor import child_environ

REPO_ROOT = Path(__file__).resolve().parents[1]


class WaitTimeout(AssertionError):
    """A condition polled by ``wait_until`` did not hold in time (fails a test like an assert)."""


class WorkerProcess:
    """``python -m hisam.jobs.stream_worker`` as a child process that tests can kill -9."""

    def __init__(self, args: list[str], log_path: Path):
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        """Start the worker; ``extra_env`` adds to its environment (e.g. fault injection)."""
        env = child_environ({"PYTHONWARNINGS": "ignore::DeprecationWarning", **(extra_env or {})})
        with open(self.log_path, "a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hisam.jobs.stream_worker", *self.args],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL: no graceful leave, no final commit (what a crash looks like)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the worker to exit by itself; returns its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned); raise WaitTimeout on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def consume_all(bootstrap: str, topic: str, stop, timeout_s: float = 30.0) -> list:
    """Read ``topic`` from the beginning (no group) until ``stop(records)`` is true."""
    from infra.kafka import TopicPartition, consumer

    c = consumer(bootstrap, consumer_timeout_ms=500)
    try:
        parts = c.partitions_for_topic(topic) or set()
        c.assign([TopicPartition(topic, p) for p in parts])
        c.seek_to_beginning()
        out: list = []
        deadline = time.monotonic() + timeout_s
        while not stop(out):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"timed out reading {topic}: {len(out)} records")
            for batch in c.poll(timeout_ms=200).values():
                out.extend(batch)
        return out
    finally:
        c.close()
