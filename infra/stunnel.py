"""stunnel, the TLS terminator the tests put in front of a service that speaks no TLS itself
(the embedded Kafka-compatible broker: ``infra.kafka_tls``).

The binary is Debian's stunnel4 unpacked under ``.tools/stunnel`` by
``scripts/install_stunnel.sh`` (``$HISAM_TOOLS`` elsewhere), else a ``stunnel4``/``stunnel`` on
PATH. ``stunnel(...)`` runs one service for the ``with`` body: TLS on a 127.0.0.1 port, the
clear text forwarded to a TCP address or a Unix socket; config, log and nothing else in a
temporary directory; the process (its own process group) stopped on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.ports import HOST, ServiceError, free_port, wait_for_port

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = "run `bash scripts/install_stunnel.sh` (Debian's stunnel4, unpacked under .tools/)"


def stunnel_binary() -> str:
    """The stunnel binary: the project's unpacked one first, then PATH; ServiceError if none."""
    tools = Path(os.environ.get("HISAM_TOOLS") or ROOT / ".tools")
    local = tools / "stunnel" / "usr" / "bin" / "stunnel4"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise ServiceError(f"stunnel not found ({local}, PATH); {INSTALL_HINT}")


def install_stunnel(timeout_s: float = 300.0) -> str:
    """Run ``scripts/install_stunnel.sh`` (a no-op when installed) and return the binary;
    ServiceError with the script's output when it fails."""
    script = ROOT / "scripts" / "install_stunnel.sh"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=timeout_s, check=False)
    if res.returncode != 0:
        raise ServiceError(f"{script} failed ({res.returncode}): {res.stdout[-600:]} {res.stderr[-1200:]}")
    return stunnel_binary()


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key; ``client_ca``: require client certificates chaining
    to this CA (mutual TLS), None: any client may connect."""

    cert_file: Path
    key_file: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class Stunnel:
    host: str
    port: int
    pid: int
    log_file: Path


def _config(accept: str, connect: str, tls: TlsFiles, log_file: Path) -> str:
    lines = [
        "foreground = yes",
        "pid =",
        f"output = {log_file}",
        "debug = notice",
        "[tls]",
        f"accept = {accept}",
        f"connect = {connect}",
        f"cert = {tls.cert_file}",
        f"key = {tls.key_file}",
        "sslVersionMin = TLSv1.2",
    ]
    if tls.client_ca is not None:
        lines += [f"CAfile = {tls.client_ca}", "verifyChain = yes", "requireCert = yes"]
    return "\n".join(lines) + "\n"


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the process group, SIGKILL after ``grace_s``; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def stunnel(connect: str, tls: TlsFiles, port: int | None = None, timeout_s: float = 10.0) -> Iterator[Stunnel]:
    """TLS on 127.0.0.1:``port`` (a free one by default), forwarded in clear to ``connect``
    (``host:port`` or a Unix socket path), for the ``with`` body."""
    exe = stunnel_binary()
    tmp = Path(tempfile.mkdtemp(prefix="hisam-stunnel-"))
    try:
        chosen = port or free_port()
        log_file = tmp / "stunnel.log"
        conf = tmp / "stunnel.conf"
        conf.write_text(_config(f"{HOST}:{chosen}", connect, tls, log_file))
        proc = subprocess.Popen(
            [exe, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            try:
                wait_for_port(HOST, chosen, timeout_s, proc)
            except ServiceError as e:
                tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
                raise ServiceError(f"stunnel did not start: {e}; log: {tail}") from e
            log.info("stunnel on %s:%d -> %s (pid %d)", HOST, chosen, connect, proc.pid)
            yield Stunnel(HOST, chosen, proc.pid, log_file)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
