"""Security of the Rank port: TLS, mutual TLS and bearer tokens (docs/operations.md "Security: the Rank port").

Server side (``ServerSecurity``, used by serving/server.py):

- TLS: ``tls_cert`` and ``tls_key`` (PEM) make the server listen with TLS only (no
  plaintext port). The files are read once, when the server starts: a new certificate
  takes effect at the next restart (a rolling restart of the replicas).
- Mutual TLS: ``tls_client_ca`` (PEM) makes a client certificate required, verified
  against that CA; a client without one, or with one from another CA, fails the handshake.
- Tokens: ``auth_token_file`` holds the accepted bearer tokens, one a line. A call must
  carry ``authorization: Bearer <token>`` metadata matching one of them (compared in
  constant time), else it is refused with UNAUTHENTICATED before the servicer runs. The
  file is read again whenever it changes (mtime, size or inode), so a token is rotated
  without a restart: write the new token next to the old one, move the clients, then
  remove the old one. A file that cannot be read, or holds no token, at a later read is
  ignored with a warning (the tokens in force stay), so that a half-written file never
  locks every client out; at start it is an error. The health service
  (``grpc.health.v1``) needs no token: probes do not carry one.

Client side (``ClientSecurity``, used by serving/load.py and every Rank caller):
``rank_channel`` builds the channel (TLS with ``tls_ca`` as the trusted root, plus a client
certificate for mutual TLS; plaintext otherwise) with an interceptor that adds the token
(the first line of ``auth_token_file``, read again when the file changes) to every call.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from infra.watched_file import WatchedFile

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
BEARER = "Bearer "
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


class TokenFile:
    """The tokens in a file, one a line (blank lines ignored), read again when the file changes
    (infra/watched_file.py: one stat a call; a bad later read keeps the tokens in force)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._file = WatchedFile(path, _parse_tokens, "token file")
        self.path = self._file.path

    def tokens(self) -> tuple[bytes, ...]:
        return self._file.value()

    def current(self) -> str:
        """The token a client sends: the first line."""
        return self.tokens()[0].decode()

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the tokens, each compared in constant time."""
        if presented is None:
            return False
        got = presented.encode()
        return any([hmac.compare_digest(got, t) for t in self.tokens()])  # noqa: C419 - compare them all


def _parse_tokens(text: str) -> tuple[bytes, ...]:
    tokens = tuple(line.strip().encode() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ValueError("holds no token")
    return tokens


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER) :].strip()
    return None


def _refusing_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED without running it."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid bearer token with UNAUTHENTICATED (module docstring).

    Methods starting with one of ``exempt`` pass without a token; ``on_refused(method)`` is
    called for every refused call (the server counts Rank's in its request metric).
    """

    def __init__(
        self,
        tokens: TokenFile,
        exempt: Sequence[str] = (HEALTH_METHOD_PREFIX,),
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.tokens, self.exempt, self.on_refused = tokens, tuple(exempt), on_refused

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self.exempt):
            return handler
        presented = bearer_token(handler_call_details.invocation_metadata)
        if self.tokens.accepts(presented):
            return handler
        if self.on_refused is not None:
            self.on_refused(method)
        why = "no bearer token" if presented is None else "the bearer token is not valid"
        return _refusing_handler(handler, f"{why} (authorization: Bearer <token> metadata)")


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


@dataclass(frozen=True)
class ServerSecurity:
    """How the Rank port is protected (module docstring); the default protects nothing."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs TLS (--tls-cert, --tls-key)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def describe(self) -> str:
        tls = "plaintext" if not self.tls else "mutual TLS" if self.tls_client_ca else "TLS"
        return tls + (", bearer token" if self.auth_token_file else "")

    def credentials(self) -> grpc.ServerCredentials | None:
        """The server's TLS credentials, the files read now; None without TLS."""
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(_read(self.tls_key), _read(self.tls_cert))],
            root_certificates=_read(self.tls_client_ca),
            require_client_auth=self.tls_client_ca is not None,
        )

    def interceptors(self, on_refused: Callable[[str], None] | None = None) -> list[grpc.aio.ServerInterceptor]:
        if self.auth_token_file is None:
            return []
        return [TokenAuthInterceptor(TokenFile(self.auth_token_file), on_refused=on_refused)]


# --- clients ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a protected Rank port (module docstring); the default: plaintext, no token."""

    tls_ca: Path | None = None  # trusted root for the server's certificate: TLS on
    tls_client_cert: Path | None = None  # mutual TLS
    tls_client_key: Path | None = None
    auth_token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("a client certificate needs its key (--tls-client-cert, --tls-client-key)")
        if self.tls_client_cert is not None and self.tls_ca is None:
            raise ValueError("a client certificate (mutual TLS) needs TLS: --tls-ca")

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_client_key),
            certificate_chain=_read(self.tls_client_cert),
        )


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,
):
    pass


def _with_token(details, tokens: TokenFile):
    metadata = [*(details.metadata or ()), (AUTH_HEADER, BEARER + tokens.current())]
    return _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_token(client_call_details, self.tokens), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_token(client_call_details, self.tokens), request)


class _AioToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.tokens), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.tokens), request)


def rank_channel(
    address: str, security: ClientSecurity | None = None, *, aio: bool = False, options: Sequence[tuple] = ()
):
    """A channel to a Rank server at ``address``: TLS or plaintext, and the token added to every
    call, as ``security`` says (None: plaintext, no token). ``aio``: a ``grpc.aio`` channel (create
    it on the event loop that uses it). Works as a context manager, like the channels of grpc."""
    security = security or ClientSecurity()
    creds = security.channel_credentials()
    tokens = TokenFile(security.auth_token_file) if security.auth_token_file is not None else None
    if aio:
        interceptors = [_AioToken(tokens)] if tokens else None
        if creds is None:
            return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
        return grpc.aio.secure_channel(address, creds, options=list(options), interceptors=interceptors)
    channel = (
        grpc.insecure_channel(address, options=list(options))
        if creds is None
        else grpc.secure_channel(address, creds, options=list(options))
    )
    return grpc.intercept_channel(channel, _SyncToken(tokens)) if tokens else channel


# --- command-line options ---------------------------------------------------------------------------


def add_server_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security of the Rank port (docs/operations.md)")
    group.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM): listen with TLS only")
    group.add_argument("--tls-key", type=Path, default=None, help="the server certificate's private key (PEM)")
    group.add_argument(
        "--tls-client-ca", type=Path, default=None, help="CA (PEM) of client certificates: mutual TLS, required"
    )
    group.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help="accepted bearer tokens, one a line, re-read when the file changes (health needs none)",
    )


def server_security_from_args(args: argparse.Namespace) -> ServerSecurity:
    return ServerSecurity(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file)


def add_client_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reaching a protected Rank port (docs/operations.md)")
    group.add_argument("--tls-ca", type=Path, default=None, help="CA (PEM) of the Rank server's certificate: TLS")
    group.add_argument("--tls-client-cert", type=Path, default=None, help="client certificate (PEM): mutual TLS")
    group.add_argument("--tls-client-key", type=Path, default=None, help="the client certificate's key (PEM)")
    group.add_argument(
        "--auth-token-file", type=Path, default=None, help="file whose first line is the bearer token sent"
    )


def client_security_from_args(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.auth_token_file)
