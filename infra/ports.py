"""Addresses of the project's local services: the loopback host, free ports, waiting for a port.

Every service the project starts (broker, Redis, Triton, the Rank server in tests and
benchmarks) binds 127.0.0.1 on a port the OS picked, so nothing clashes with a service
that merely happens to be running on the machine.
"""

from __future__ import annotations

import socket
import subprocess
import time

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service binary is missing, or a service did not come up in time."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; callers retry on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP connections on host:port.

    Raises ServiceError on timeout or when ``proc`` exits first (its output names the cause).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(
                f"process {proc.args[0]!r} exited with code {proc.returncode} before {host}:{port} opened"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise ServiceError(f"nothing listening on {host}:{port} after {timeout_s:.1f}s")
