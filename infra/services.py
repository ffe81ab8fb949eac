"""Start and stop the project's own services: the Kafka-compatible broker and a private Redis.

Both run on free 127.0.0.1 ports with their data in a temporary directory, so tests, the
main job and benchmarks never touch a system Redis or Kafka another process relies on
(docs/operations.md: a system Redis may already listen on 6379). Each service is a context
manager that yields a small typed record with its address and stops the process on exit,
even when the body raises.

The broker is ``noida-db`` (installed from PyPI with the project); Redis is the
``redis-server`` binary (``scripts/services.sh`` installs it with apt when missing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.ports import HOST, ServiceError, free_port, wait_for_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaBroker:
    """A running broker: ``bootstrap`` is what Kafka clients take as bootstrap servers."""

    host: str
    port: int
    data_dir: Path
    pid: int | None = None  # the broker process (None: not known)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RedisServer:
    """A running private Redis; ``url`` is a redis-py URL, ``connection_string`` Feast's form."""

    host: str
    port: int
    data_dir: Path
    pid: int
    tls: bool = False  # the port speaks TLS only (``rediss://``)
    username: str | None = None  # the ACL user made at start (the default user is then off)

    @property
    def url(self) -> str:
        """The URL without credentials (pass the password separately, e.g. as a file)."""
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    @property
    def connection_string(self) -> str:
        return f"{self.host}:{self.port}"


def _binary(name: str, hint: str) -> str:
    """Absolute path of a binary: next to this interpreter first (venv scripts), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"{name!r} not found on PATH or next to {sys.executable}; {hint}")
    return found


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _noida_pid(data_dir: Path) -> int | None:
    """The pid noida-db records in its control file (None if it has none we can read)."""
    try:
        return int(json.loads((data_dir / "noida.control.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def kafka_broker(
    port: int | None = None, data_dir: Path | None = None, timeout_s: float = 20.0
) -> Iterator[KafkaBroker]:
    """Run the Kafka-compatible broker (noida-db, Kafka service only) for the ``with`` body.

    With no ``data_dir`` the broker keeps its log in a fresh temporary directory that is
    deleted afterwards; pass one to keep data between runs (it is then left in place).
    """
    exe = _binary("noida-db", "install the project (`bash scripts/setup.sh`): noida-db comes from PyPI")
    owns_dir = data_dir is None
    ddir = Path(tempfile.mkdtemp(prefix="hisam-kafka-")) if owns_dir else Path(data_dir)
    ddir.mkdir(parents=True, exist_ok=True)
    chosen = port or free_port()
    cmd = [exe, "up", "--only", "kafka", "--kafka-port", str(chosen), "--data-dir", str(ddir)]
    # `up` daemonises and returns at once; its stderr carries a harmless glibc warning.
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if res.returncode != 0:
        if owns_dir:
            shutil.rmtree(ddir, ignore_errors=True)
        raise ServiceError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stdout[-800:]} {res.stderr[-800:]}")
    broker = KafkaBroker(HOST, chosen, ddir)
    try:
        try:
            wait_for_port(HOST, chosen, timeout_s)
        except ServiceError as e:
            raise ServiceError(f"{e}; broker log: {_tail(ddir / 'noida.log')}") from e
        broker = dataclasses.replace(broker, pid=_noida_pid(ddir))
        log.info("kafka-compatible broker up on %s (data %s)", broker.bootstrap, ddir)
        yield broker
    finally:
        down = subprocess.run(
            [exe, "down", "--data-dir", str(ddir)], capture_output=True, text=True, timeout=30, check=False
        )
        if down.returncode != 0:
            log.warning("noida-db down returned %d: %s", down.returncode, down.stdout[-400:])
        if owns_dir:
            shutil.rmtree(ddir, ignore_errors=True)
        log.info("kafka-compatible broker on %s stopped", broker.bootstrap)


@dataclass(frozen=True)
class RedisTls:
    """TLS for a private Redis: its certificate and key, the CA its clients' certificates
    must chain to, and whether clients must present one (``auth_clients``: no|optional|yes)."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    auth_clients: str = "optional"


@contextlib.contextmanager
def redis_server(
    port: int | None = None,
    data_dir: Path | None = None,
    timeout_s: float = 10.0,
    durable: bool = False,
    acl_user: tuple[str, str] | None = None,
    tls: RedisTls | None = None,
) -> Iterator[RedisServer]:
    """Run a private ``redis-server`` bound to 127.0.0.1 for the ``with`` body.

    Not persistent by default. ``durable=True`` turns on the append-only file with an fsync
    per write (``appendfsync always``): a restart on the same ``data_dir`` keeps every write
    that was acknowledged, as a production Redis holding an online store is configured.
    ``acl_user=(name, password)`` writes an ACL file (mode 0600, in the data dir) with that
    user, all rights, and the ``default`` user off. ``tls`` serves TLS only on the port
    (``--port 0 --tls-port``). docs/operations.md "Security: Redis".
    """
    exe = _binary("redis-server", "run `bash scripts/services.sh install` (apt-get install redis-server)")
    owns_dir = data_dir is None
    ddir = Path(tempfile.mkdtemp(prefix="hisam-redis-")) if owns_dir else Path(data_dir)
    ddir.mkdir(parents=True, exist_ok=True)
    security: list[str] = []
    if acl_user is not None:
        name, password = acl_user
        if not name or any(c.isspace() for c in name + password) or not password:
            raise ValueError("acl_user: a non-empty name and password without whitespace")
        aclfile = ddir / "users.acl"
        fd = os.open(aclfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"user default off\nuser {name} on >{password} ~* &* +@all\n")
        security += ["--aclfile", str(aclfile)]
    for attempt in range(3):
        chosen = port or free_port()
        logfile = ddir / "redis.log"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        if tls is not None:
            listen = [
                "--port", "0", "--tls-port", str(chosen), "--tls-cert-file", str(tls.cert_file),
                "--tls-key-file", str(tls.key_file), "--tls-ca-cert-file", str(tls.ca_file),
                "--tls-auth-clients", tls.auth_clients,
            ]  # fmt: skip
        else:
            listen = ["--port", str(chosen)]
        cmd = [
            exe, *listen, "--bind", HOST, "--save", "", *persistence, *security,
            "--dir", str(ddir), "--logfile", str(logfile), "--daemonize", "no",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port(HOST, chosen, timeout_s, proc)
            break
        except ServiceError as e:
            _stop(proc)
            if port is not None or attempt == 2:
                if owns_dir:
                    shutil.rmtree(ddir, ignore_errors=True)
                raise ServiceError(f"redis-server did not start: {e}; log: {_tail(logfile)}") from e
            log.debug("redis port %d clashed, retrying: %s", chosen, e)
    server = RedisServer(HOST, chosen, ddir, proc.pid, tls=tls is not None, username=acl_user and acl_user[0])
    try:
        log.info("private redis up on %s (pid %d)", server.connection_string, proc.pid)
        yield server
    finally:
        _stop(proc)
        if owns_dir:
            shutil.rmtree(ddir, ignore_errors=True)
        log.info("private redis on %s stopped", server.connection_string)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after a grace period; always reaps the child."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
