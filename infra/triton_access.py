"""Who may call which Triton API, and over what: keys for its restricted APIs, TLS for its gRPC port.

Triton (2.51) can demand a header on chosen groups of its APIs (``--grpc-restricted-protocol``
and ``--http-restricted-api``, one ``APIS:HEADER=VALUE`` per group). hisam splits them in two
(docs/operations.md "Security: Triton"):

- the client key (``key_file``, header ``hisam-triton-key``): ``inference`` and ``metadata``,
  what the Rank servers and the trainer call;
- the admin key (``admin_key_file``, header ``hisam-triton-admin-key``): ``model-repository``
  (the index, load and unload), ``model-config``, ``statistics``, ``trace``, ``logging`` and
  ``shared-memory``, which no hisam component calls: only an operator who holds the key.

``health`` stays open on both ports: the kubelet's probes and the trainer's readiness wait
carry no secret (the trainer passes the client key anyway). Triton takes a key's value only on
its command line, so the chart's Triton container reads it from the mounted Secret in a shell
(``$(cat FILE)``): the value is never in a rendered manifest, but it is in the process's
arguments inside the pod, visible to whoever can exec into that pod.

TLS: ``tls_cert``/``tls_key`` make Triton's gRPC port TLS-only (``--grpc-use-ssl``), and
``tls_client_ca`` makes a client certificate required (mutual TLS). Clients trust
``tls_ca`` and present ``client_cert``/``client_key`` for mutual TLS. Triton's HTTP port has
no TLS of its own; hisam uses it only for the readiness probe, and the chart's NetworkPolicy
opens it to nobody but the kubelet.

The client stats its key file at every call and reads it again when it changed
(infra/watched_file.py), so a rotated key reaches the clients at once; Triton itself takes a new key at its next restart (rotate by restarting
Triton with the new key while the clients' file already holds it: a call between the two is
refused once and retried by the caller).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from infra.watched_file import WatchedFile

CLIENT_HEADER = "hisam-triton-key"
ADMIN_HEADER = "hisam-triton-admin-key"
# Triton's gRPC endpoint looks for a restricted protocol's header under this prefix (its HTTP
# endpoint under the bare name): ``triton-grpc-protocol-hisam-triton-key``.
GRPC_PREFIX = "triton-grpc-protocol-"
CLIENT_APIS = ("inference", "metadata")
ADMIN_APIS = ("model-repository", "model-config", "statistics", "trace", "logging", "shared-memory")


def _parse_key(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("is empty")
    # Triton splits its flag on ':' and '='; gRPC metadata values are printable ASCII.
    if any(c in value for c in ":=,") or not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError("must hold printable ASCII without spaces, ':', '=' or ','")
    return value


def _read_key(path: Path) -> str:
    """The key in ``path`` now (the server's command line is built once)."""
    return WatchedFile(path, _parse_key, "Triton key file").value()


@dataclass(frozen=True)
class TritonAccess:
    """Keys and TLS files of one side (server or client) of the Triton hop; all optional."""

    key_file: Path | None = None
    admin_key_file: Path | None = None  # server side only
    tls_cert: Path | None = None  # server: its certificate (with tls_key)
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # server: require client certificates from this CA
    tls_ca: Path | None = None  # client: trust this CA for Triton's certificate
    client_cert: Path | None = None  # client: certificate for mutual TLS (with client_key)
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("Triton tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("Triton tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("Triton client_cert and client_key go together")
        if self.client_cert is not None and self.tls_ca is None:
            raise ValueError("a Triton client certificate needs tls_ca (mutual TLS is TLS)")
        if self.admin_key_file is not None:
            _read_key(self.admin_key_file)  # fail at start, not at the first call
        # The client key is consulted at every call: one stat, read again when it changes.
        watched = None if self.key_file is None else WatchedFile(self.key_file, _parse_key, "Triton key file")
        object.__setattr__(self, "_key", watched)

    # -- server side -------------------------------------------------------------------
    def server_args(self) -> list[str]:
        """tritonserver flags for these keys and TLS files (empty: Triton as before, open)."""
        out: list[str] = []
        for path, apis, header in (
            (self.key_file, CLIENT_APIS, CLIENT_HEADER),
            (self.admin_key_file, ADMIN_APIS, ADMIN_HEADER),
        ):
            if path is not None:
                rule = f"{','.join(apis)}:{header}={_read_key(path)}"
                out += [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]
        if self.tls_cert is not None:
            out += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={Path(self.tls_cert).resolve()}",
                f"--grpc-server-key={Path(self.tls_key).resolve()}",
            ]
            if self.tls_client_ca is not None:
                out += [f"--grpc-root-cert={Path(self.tls_client_ca).resolve()}", "--grpc-use-ssl-mutual=true"]
        return out

    # -- client side -------------------------------------------------------------------
    def headers(self) -> dict[str, str] | None:
        """The gRPC metadata of every call to Triton (the client key in force), or None without one."""
        return None if self._key is None else {GRPC_PREFIX + CLIENT_HEADER: self._key.value()}

    def http_headers(self) -> dict[str, str]:
        """The same key for Triton's HTTP endpoint (the bare header name); empty without one."""
        return {} if self._key is None else {CLIENT_HEADER: self._key.value()}

    def client_kwargs(self) -> dict:
        """``tritonclient.grpc``'s InferenceServerClient TLS arguments (file paths; empty without TLS)."""
        if self.tls_ca is None:
            return {}
        kw: dict = {"ssl": True, "root_certificates": str(Path(self.tls_ca).resolve())}
        if self.client_cert is not None:
            kw["certificate_chain"] = str(Path(self.client_cert).resolve())
            kw["private_key"] = str(Path(self.client_key).resolve())
        return kw


OPEN = TritonAccess()


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """A Triton client's options (the Rank server, the trainer), each with an environment default."""
    env = os.environ.get
    g = parser.add_argument_group("Triton access (docs/operations.md, Security: Triton)")
    g.add_argument("--triton-key-file", type=Path, default=env("HISAM_TRITON_KEY_FILE"), help="the client key's file")
    g.add_argument("--triton-tls-ca", type=Path, default=env("HISAM_TRITON_TLS_CA"), help="CA of Triton's gRPC TLS")
    g.add_argument("--triton-tls-cert", type=Path, default=env("HISAM_TRITON_TLS_CERT"), help="client certificate")
    g.add_argument("--triton-tls-key", type=Path, default=env("HISAM_TRITON_TLS_KEY"), help="client certificate's key")


def client_access_from_args(args: argparse.Namespace) -> TritonAccess:
    return TritonAccess(
        key_file=getattr(args, "triton_key_file", None),
        tls_ca=getattr(args, "triton_tls_ca", None),
        client_cert=getattr(args, "triton_tls_cert", None),
        client_key=getattr(args, "triton_tls_key", None),
    )


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The embedded Triton's admin key (``hisam serve`` without ``--triton-url``; it listens on 127.0.0.1
    and takes the client key of ``--triton-key-file``; TLS is for a Triton of its own, ``--triton-url``)."""
    parser.add_argument(
        "--triton-admin-key-file",
        type=Path,
        default=os.environ.get("HISAM_TRITON_ADMIN_KEY_FILE"),
        help="embedded Triton: restrict its repository, config, statistics, trace and logging APIs to this key",
    )
