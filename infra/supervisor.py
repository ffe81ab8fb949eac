"""Run the project's long-lived commands as child processes and stop them cleanly.

The whole-loop job (``hisam run``) and the reliability tests start the stream worker, the
Rank server and the trainer as processes, the way a process manager would: each child runs
``python -m <module>`` (the command's ``run_standalone`` entry), in its own session so that a
Ctrl-C in the terminal reaches only the supervisor, which then stops the children in the
reverse order of their start (SIGTERM, a grace period, then SIGKILL). Each child's output
goes to a log file that errors quote.

``Supervisor.check()`` raises ``ChildExited`` when a child the supervisor still expects to
run has exited: a crashed worker stops the loop with its log, instead of a silent stall.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


class ChildExited(RuntimeError):
    """A supervised child exited while it was expected to run."""


PARENT_ENV = "HISAM_SUPERVISOR_PID"

# Set by ``import feast`` (feast.metrics) when absent: prometheus_client's multiprocess mode.
_PROMETHEUS_MP_VARS = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")


def child_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child process, with ``extra`` added.

    Without what ``import feast`` put there: Feast points prometheus_client at a temporary
    multiprocess directory of its own, which a child would inherit, so that every metric
    update in the child takes a global lock and writes to files in a directory its parent
    deletes on exit (a metric first used after that fails). Variables the user set are kept.
    """
    env = dict(os.environ)
    feast_metrics = sys.modules.get("feast.metrics")
    feast_dir = getattr(feast_metrics, "_prometheus_mp_dir", None)
    if feast_dir is not None and getattr(feast_metrics, "_owns_mp_dir", False):
        for name in _PROMETHEUS_MP_VARS:
            if env.get(name) == feast_dir:
                del env[name]
    env.update(extra or {})
    return env


def die_with_parent() -> None:
    """Linux: have this process SIGTERMed when its supervisor dies, even by SIGKILL.

    Called at the start of a supervised command (``hisam.cli.run_standalone``) when the
    supervisor set ``HISAM_SUPERVISOR_PID``, rather than between fork and exec (unsafe with
    threads). A supervisor already gone by then means exit at once.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):
        log.error("the supervisor (pid %s) is gone: exiting", parent)
        sys.exit(1)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_environ({**self.env, PARENT_ENV: str(os.getpid())}),
                start_new_session=True,  # Ctrl-C goes to the supervisor, which stops us in order
            )
        finally:
            out.close()
        self.started_at = time.monotonic()
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            os.killpg(self.proc.pid, sig)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the child's process group, wait ``grace_s``, then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs of SIGTERM: killing it", self.name, grace_s)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        # Anything the child left in its process group (a server it started) goes too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        """Block until a line of the child's log starts with ``prefix``; returns that line.

        A prefix, not a substring: a log record quoting the same words starts with its time.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in tail(self.log_path, 200_000).splitlines():
                if line.startswith(prefix):
                    return line
            if not self.running():
                raise ChildExited(f"{self.name} exited ({self.proc.returncode}) before printing {prefix!r}:\n"
                                  f"{tail(self.log_path)}")  # fmt: skip
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not print {prefix!r} within {timeout_s:.0f}s:\n{tail(self.log_path)}")


class Supervisor:
    """Children started in order and stopped in reverse; a context manager."""

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.env = dict(env or {})
        self.children: list[Child] = []

    def start(self, name: str, module: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        """Start ``python -m module args...`` under this interpreter."""
        child = Child(
            name,
            [sys.executable, "-m", module, *map(str, args)],
            self.log_dir / f"{name}.log",
            env={**self.env, **(env or {})},
        )
        self.children.append(child.start())
        return child

    def check(self) -> None:
        """Raise ``ChildExited`` if any child has exited."""
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                raise ChildExited(f"{c.name} exited with code {c.proc.returncode}; its log ends:\n{tail(c.log_path)}")

    def stop(self, child: Child, grace_s: float = 20.0) -> int | None:
        code = child.stop(grace_s)
        if child in self.children:
            self.children.remove(child)
        log.info("stopped %s (exit %s)", child.name, code)
        return code

    def stop_all(self, grace_s: float = 20.0) -> dict[str, int | None]:
        codes = {}
        for c in reversed(list(self.children)):
            codes[c.name] = self.stop(c, grace_s)
        return codes

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
