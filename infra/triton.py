"""Start and stop a real Triton Inference Server on a model repository (serving/repository.py).

The server is the ``tritonserver`` 2.51 binary bundled in the ``nvidia-pytriton`` wheel,
unpacked by ``scripts/install_triton.sh`` under ``.triton/`` (or ``$HISAM_TRITON_HOME``)
without touching the project's venv. Like ``infra/services.py``, ``triton_server`` is a
context manager: free 127.0.0.1 ports for gRPC, HTTP and metrics, readiness awaited,
the process group stopped on exit even when the body raises, and the log kept in a file
that errors quote.

Two traps of the bundled Python backend, handled here (docs/operations.md):
- The backend stub links ``libpython3.X.so.1.0`` and would pick the system's copy, which
  does not match this interpreter; this interpreter's lib directory goes first on
  ``LD_LIBRARY_PATH``.
- The stub runs isolated (PYTHONPATH ignored) and needs numpy<2; ``HISAM_TRITON_PYTHONPATH``
  points ``serving/triton_model.py`` at the stub's own site directory.

Model control is ``poll``: Triton rescans the repository every ``poll_s`` seconds, so a new
version published by ``repository.publish_version`` (atomic renames) is picked up with no
call to the server; with ``version_policy latest 1`` the old version is unloaded after its
in-flight requests finish.

``models_ready`` / ``wait_models_ready`` ask Triton (gRPC) whether a version of some models is
ready, every call bounded by a deadline: a Triton that accepts connections and never answers
fails the wait on time instead of stalling the caller (the trainer's publish).

``supervised_triton_server`` is the embedded server of ``hisam serve``: a watcher thread
restarts tritonserver on the same ports when it exits (with a growing pause, up to
``max_backoff_s``, while it keeps failing), so the Rank server, which reconnects by itself,
recovers from a Triton crash with nobody's help. In Kubernetes Triton is its own Deployment
and the kubelet restarts it.

``access`` (infra/triton_access.py) restricts Triton's APIs to key holders and puts TLS on its
gRPC port; the readiness helpers here take the client side of the same object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.ports import HOST, ServiceError, free_port
from infra.triton_access import OPEN, TritonAccess

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTRITON_VERSION = "0.7.0"  # scripts/install_triton.sh installs this one


@dataclass(frozen=True)
class TritonInstall:
    """Where the unpacked server lives."""

    server: Path  # the tritonserver binary
    backends: Path  # --backend-directory
    stub_site: Path  # numpy<2 + onnxruntime for the Python backend stub


@dataclass(frozen=True)
class TritonServer:
    """A running server; ``url`` is what ``tritonclient.grpc`` takes."""

    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    repo: Path
    log_path: Path
    pid: int

    @property
    def url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def find_triton(home: str | Path | None = None) -> TritonInstall:
    """The installed server; raises ServiceError saying how to install it when it is missing."""
    base = Path(home or os.environ.get("HISAM_TRITON_HOME") or REPO_ROOT / ".triton")
    root = base / f"pytriton-{PYTRITON_VERSION}" / "pytriton" / "tritonserver"
    inst = TritonInstall(root / "bin" / "tritonserver", root / "backends", base / "stub-site")
    stub = inst.backends / "python" / "triton_python_backend_stub"
    if not (inst.server.is_file() and stub.is_file() and (inst.stub_site / "onnxruntime").is_dir()):
        raise ServiceError(f"Triton is not installed under {base}: run `bash scripts/install_triton.sh`")
    return inst


def server_env(inst: TritonInstall) -> dict[str, str]:
    """The environment for tritonserver and its Python backend stubs (module docstring)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["HISAM_TRITON_PYTHONPATH"] = str(inst.stub_site.resolve())
    env.pop("PYTHONPATH", None)
    return env


def is_ready(http_url: str, timeout_s: float = 1.0) -> bool:
    """Triton's own readiness: the server is up and every model in the repository is ready."""
    try:
        with urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def models_ready(
    url: str, models: list[str], version: int | str, timeout_s: float = 2.0, access: TritonAccess = OPEN
) -> tuple[bool, str]:
    """(whether every model serves ``version``, why not) from Triton's gRPC ``url``; every call bounded.

    A server that does not answer within ``timeout_s`` (stuck, or a socket that accepts and
    never speaks) counts as not ready; nothing here waits longer than ``timeout_s``.
    """
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url, **access.client_kwargs())
        headers = access.headers()
    except Exception as e:  # noqa: BLE001 - unreadable TLS or key files: not ready, and why
        return False, f"{type(e).__name__}: {str(e).strip()[:200]}"
    try:
        for m in models:
            if not client.is_model_ready(m, str(version), headers=headers, client_timeout=timeout_s):
                return False, f"{m} version {version} not ready"
        return True, ""
    except Exception as e:  # noqa: BLE001 - not answering (refused, deadline, ...) means not ready yet
        return False, f"{type(e).__name__}: {str(e).strip()[:200]}"
    finally:
        client.close()


def wait_models_ready(
    url: str,
    models: list[str],
    version: int | str,
    timeout_s: float,
    poll_s: float = 0.1,
    call_timeout_s: float = 2.0,
    access: TritonAccess = OPEN,
) -> float:
    """Seconds until Triton at ``url`` serves ``version`` of every model; raises TimeoutError after ``timeout_s``.

    Each readiness call is bounded too (``models_ready``), so a hung server fails the wait on
    time instead of stalling the caller.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    why = "not asked"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ok, why = models_ready(url, models, version, max(0.05, min(call_timeout_s, left)), access)
        if ok:
            return time.monotonic() - t0
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(f"Triton at {url} did not serve version {version} of {models} within {timeout_s:.1f}s: {why}")


def wait_ready(server: TritonServer, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"tritonserver exited with code {proc.returncode}; log: {server.log_tail()}")
        if is_ready(server.http_url):
            return
        time.sleep(0.1)
    raise ServiceError(f"tritonserver not ready after {timeout_s:.0f}s; log: {server.log_tail()}")


def _command(
    inst: TritonInstall, repo: str | Path, ports: tuple[int, int, int], poll_s: float, access: TritonAccess = OPEN
) -> list[str]:
    return [*_base_command(inst, repo, ports, poll_s), *access.server_args()]


def _base_command(inst: TritonInstall, repo: str | Path, ports: tuple[int, int, int], poll_s: float) -> list[str]:
    return [
        str(inst.server), f"--model-repository={Path(repo).resolve()}", f"--backend-directory={inst.backends}",
        f"--grpc-address={HOST}", f"--grpc-port={ports[0]}", f"--http-address={HOST}", f"--http-port={ports[1]}",
        f"--metrics-address={HOST}", f"--metrics-port={ports[2]}", "--model-control-mode=poll",
        f"--repository-poll-secs={max(1, round(poll_s))}", "--exit-timeout-secs=5", "--log-verbose=0",
        "--strict-readiness=true", "--allow-gpu-metrics=false",
    ]  # fmt: skip


def _launch(inst: TritonInstall, cmd: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(inst), start_new_session=True)


@contextlib.contextmanager
def _log_dir(log_dir: Path | None) -> Iterator[Path]:
    """``log_dir``, or a temporary one removed afterwards."""
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        yield Path(log_dir)
        return
    ldir = Path(tempfile.mkdtemp(prefix="hisam-triton-"))
    try:
        yield ldir
    finally:
        with contextlib.suppress(OSError):
            for f in ldir.iterdir():
                f.unlink()
            ldir.rmdir()


@contextlib.contextmanager
def triton_server(
    repo: str | Path,
    *,
    grpc_port: int | None = None,
    http_port: int | None = None,
    metrics_port: int | None = None,
    poll_s: float = 1.0,
    timeout_s: float = 90.0,
    log_dir: Path | None = None,
    home: str | Path | None = None,
    access: TritonAccess = OPEN,
) -> Iterator[TritonServer]:
    """Run tritonserver on ``repo`` for the ``with`` body; yields once every model is ready."""
    inst = find_triton(home)
    ports = (grpc_port or free_port(), http_port or free_port(), metrics_port or free_port())
    with _log_dir(log_dir) as ldir:
        log_path = ldir / "tritonserver.log"
        proc = _launch(inst, _command(inst, repo, ports, poll_s, access), log_path)
        server = TritonServer(HOST, *ports, Path(repo), log_path, proc.pid)
        try:
            wait_ready(server, timeout_s, proc)
            log.info(
                "tritonserver up: gRPC %s, HTTP %s (pid %d, log %s)", server.url, server.http_url, proc.pid, log_path
            )
            yield server
        finally:
            stop_process_group(proc)
            log.info("tritonserver on %s stopped", server.url)


class TritonSupervisor:
    """A tritonserver kept running: restarted on the same ports whenever it exits (module docstring)."""

    def __init__(
        self,
        inst: TritonInstall,
        cmd: list[str],
        server: TritonServer,
        proc: subprocess.Popen,
        *,
        timeout_s: float,
        check_s: float,
        max_backoff_s: float,
    ) -> None:
        self._inst, self._cmd, self._timeout_s = inst, cmd, timeout_s
        self._check_s, self._max_backoff_s = check_s, max_backoff_s
        self.server, self.proc = server, proc
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # proc and server change together
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url  # the same for every restart

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stop.wait(self._check_s):
            code = self.proc.poll()
            if code is None:
                continue
            log.warning(
                "tritonserver (pid %d) exited with code %s: restarting it; log tail: %s",
                self.proc.pid, code, self.server.log_tail(500), extra={"triton_exit_code": code},
            )  # fmt: skip
            stop_process_group(self.proc)  # Python backend stubs it may have left behind
            if self._stop.wait(backoff):
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self.proc = _launch(self._inst, self._cmd, self.server.log_path)
                self.server = dataclasses.replace(self.server, pid=self.proc.pid)
                self.restarts += 1
            try:
                wait_ready(self.server, self._timeout_s, self.proc)
                log.info("tritonserver restarted on %s (pid %d)", self.url, self.proc.pid)
                backoff = 1.0
            except ServiceError as e:
                log.error("tritonserver did not come back: %s", e)
                backoff = min(backoff * 2, self._max_backoff_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            stop_process_group(self.proc)
        if self._thread.is_alive():
            self._thread.join(self._timeout_s + 15)


@contextlib.contextmanager
def supervised_triton_server(
    repo: str | Path,
    *,
    poll_s: float = 1.0,
    timeout_s: float = 90.0,
    log_dir: Path | None = None,
    home: str | Path | None = None,
    check_s: float = 0.5,
    max_backoff_s: float = 30.0,
    access: TritonAccess = OPEN,
) -> Iterator[TritonSupervisor]:
    """``triton_server`` restarted on the same ports whenever it exits, for the ``with`` body."""
    inst = find_triton(home)
    ports = (free_port(), free_port(), free_port())
    cmd = _command(inst, repo, ports, poll_s, access)
    with _log_dir(log_dir) as ldir:
        log_path = ldir / "tritonserver.log"
        proc = _launch(inst, cmd, log_path)
        server = TritonServer(HOST, *ports, Path(repo), log_path, proc.pid)
        sup = TritonSupervisor(
            inst, cmd, server, proc, timeout_s=timeout_s, check_s=check_s, max_backoff_s=max_backoff_s
        )
        try:
            wait_ready(server, timeout_s, proc)
            log.info("tritonserver up, supervised: gRPC %s (pid %d, log %s)", server.url, proc.pid, log_path)
            sup.start()
            yield sup
        finally:
            sup.stop()
            log.info("tritonserver on %s stopped (%d restart(s))", server.url, sup.restarts)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server (it drains in-flight requests), SIGKILL its group after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a killed server
