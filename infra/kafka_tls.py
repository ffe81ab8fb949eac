"""The embedded broker behind a real TLS terminator: Kafka over TLS for the security tests
(docs/operations.md "Security: Kafka").

The embedded broker (noida-db) speaks no TLS, and it advertises exactly the address it binds
(``--host``/``--kafka-port``; it has no advertised-listener option), while a Kafka client
connects to the *advertised* address after its first metadata request. So TLS must be served
on the very address the broker binds and advertises, which one host cannot do twice. The
broker therefore runs in its own network namespace, on that namespace's 127.0.0.1:P, and
advertises 127.0.0.1:P; stunnel serves TLS on the host's 127.0.0.1:P and forwards the clear
text through a Unix socket (a file, which crosses namespaces; in a 0700 directory) to a
small relay inside the namespace, which connects to the broker. Every connection a client
makes, the bootstrap one and those to the advertised broker, is TLS through stunnel, and the
broker is reachable in clear by no TCP client on the host at all.

``tls_kafka_broker(...)`` runs all of it for the ``with`` body. ``python -m infra.kafka_tls``
is the in-namespace part: it enters a new network namespace (as root, or through a user
namespace otherwise), brings its loopback up, starts the broker, relays, and stops the
broker on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.ports import HOST, ServiceError, free_port
from infra.stunnel import TlsFiles, stunnel

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
READY = "ready"


@dataclass(frozen=True)
class TlsKafkaBroker:
    """A broker reachable only over TLS: ``bootstrap`` is its TLS address (the advertised one)."""

    host: str
    port: int
    data_dir: Path
    stunnel_pid: int
    relay_pid: int
    stunnel_log: Path

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


# -- the in-namespace part ------------------------------------------------------------------


def _enter_network_namespace() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET) refused ({os.strerror(err)}): no network namespace")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _loopback_up() -> None:
    """``ip link set lo up``, by ioctl (a new network namespace's loopback is down)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh22x", b"lo", flags | iff_up))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _relay(unix_path: Path, port: int, stop: asyncio.Event) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            br, bw = await asyncio.open_connection(HOST, port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, bw), _pipe(br, cw))

    server = await asyncio.start_unix_server(handle, path=str(unix_path))
    os.chmod(unix_path, 0o600)
    print(READY, flush=True)
    async with server:
        await stop.wait()


def _namespace_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.kafka_tls", description="the broker in its own namespace")
    p.add_argument("--port", type=int, required=True, help="the broker's port (and the advertised one)")
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket the relay listens on")
    p.add_argument("--data-dir", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _enter_network_namespace()
    _loopback_up()
    from infra.services import kafka_broker

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with kafka_broker(port=args.port, data_dir=args.data_dir):
        loop.run_until_complete(_relay(args.socket, args.port, stop))
    loop.close()
    return 0


# -- the host part --------------------------------------------------------------------------


@contextlib.contextmanager
def tls_kafka_broker(tls: TlsFiles, timeout_s: float = 30.0) -> Iterator[TlsKafkaBroker]:
    """The embedded broker, reachable only through stunnel's TLS on 127.0.0.1 (module docstring),
    for the ``with`` body; its data in a temporary directory, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="hisam-kafka-tls-"))
    os.chmod(tmp, 0o700)
    sock, data_dir, relay_log = tmp / "broker.sock", tmp / "data", tmp / "relay.log"
    port = free_port()
    cmd = [
        sys.executable, "-m", "infra.kafka_tls", "--port", str(port), "--socket", str(sock),
        "--data-dir", str(data_dir),
    ]  # fmt: skip
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with open(relay_log, "w") as out:
        relay = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=out, text=True, start_new_session=True, env=env, cwd=root
        )
    try:
        deadline = time.monotonic() + timeout_s
        line = ""
        while line != READY and relay.poll() is None and (left := deadline - time.monotonic()) > 0:
            if select.select([relay.stdout], [], [], min(left, 0.5))[0]:
                line = relay.stdout.readline().strip()  # READY once the broker and the relay are up
        if line != READY:
            raise ServiceError(
                f"the broker's namespace did not come up (exit {relay.poll()}): {relay_log.read_text()[-1500:]}"
            )
        with stunnel(str(sock), tls, port=port) as tunnel:
            broker = TlsKafkaBroker(HOST, port, data_dir, tunnel.pid, relay.pid, tunnel.log_file)
            log.info("TLS broker on %s (broker in its own network namespace)", broker.bootstrap)
            yield broker
    finally:
        if relay.poll() is None:
            relay.send_signal(signal.SIGTERM)  # the relay stops the broker (noida-db down), then exits
            try:
                relay.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(relay.pid, signal.SIGKILL)
                relay.wait()
        relay.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(_namespace_main())
