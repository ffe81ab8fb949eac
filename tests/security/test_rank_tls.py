"""The Rank port's security (serving/security.py, docs/operations.md "Security: the Rank port").

Real components: the gRPC Rank server (serving/server.py) on a TCP port, in a thread, the
ranker on the tiny model's graphs in ONNX Runtime over a filled SQLite online store, and
real TLS: a CA, a server certificate for 127.0.0.1 and localhost, client certificates from
that CA and from another one, all generated here with ``cryptography``. Two servers: TLS
with a bearer-token file (reflection off, the default), and mutual TLS with reflection on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pki import _cert, _key, _write_pair
from prometheus_client import REGISTRY

from features.store import open_stream_store
from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
from serving.backends import OrtBackend
from serving.load import health_status, rank_calls
from serving.online import OnlineReader, store_config_for_reads
from serving.profiles import Profiles
from serving.ranking import Ranker, model_info
from serving.security import ClientSecurity, ServerSecurity, rank_channel
from serving.server import SERVICE_NAME, rank_server_thread

TIMEOUT_S = 10.0


# --- certificates ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA with a server and a client certificate, and another CA with its own client certificate."""
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for prefix in ("", "other_"):
        ca_key = _key()
        ca = _cert(f"hisam test {prefix}CA", ca_key, ca=True)
        out[f"{prefix}ca"], _ = _write_pair(d, f"{prefix}ca", ca, ca_key)
        client_key = _key()
        client = _cert(f"{prefix}client", client_key, ca, ca_key)
        out[f"{prefix}client_cert"], out[f"{prefix}client_key"] = _write_pair(d, f"{prefix}client", client, client_key)
        if not prefix:
            server_key = _key()
            server = _cert("localhost", server_key, ca, ca_key, server=True)
            out["server_cert"], out["server_key"] = _write_pair(d, "server", server, server_key)
    return out


# --- servers --------------------------------------------------------------------------------------


def _write_tokens(path: Path, *tokens: str) -> None:
    """Replace the file at once (a new inode), as a rotation should."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(t + "\n" for t in tokens))
    os.replace(tmp, path)


@contextlib.contextmanager
def _server(model_repo, sqlite_store, security: ServerSecurity, reflection: bool = False) -> Iterator[str]:
    def make_ranker() -> Ranker:
        reader = OnlineReader(open_stream_store(store_config_for_reads(sqlite_store.cfg, 5.0)), read_timeout_s=5.0)
        return Ranker(OrtBackend(model_repo), reader, Profiles.empty(), model_info(model_repo), default_timeout_s=10.0)

    with rank_server_thread(
        make_ranker, grace_s=0.5, health_interval_s=0.2, security=security, reflection=reflection
    ) as handle:
        yield handle.address


@pytest.fixture(scope="module")
def token_server(model_repo, sqlite_store, pki, tmp_path_factory) -> Iterator[dict]:
    """TLS and a token file (reflection off: the default)."""
    d = tmp_path_factory.mktemp("tokens")
    tokens = d / "server-tokens"
    _write_tokens(tokens, "old-token")
    security = ServerSecurity(pki["server_cert"], pki["server_key"], auth_token_file=tokens)
    with _server(model_repo, sqlite_store, security) as address:
        yield {"address": address, "tokens": tokens, "dir": d}


@pytest.fixture(scope="module")
def mtls_server(model_repo, sqlite_store, pki) -> Iterator[str]:
    """Mutual TLS, reflection on."""
    security = ServerSecurity(pki["server_cert"], pki["server_key"], tls_client_ca=pki["ca"])
    with _server(model_repo, sqlite_store, security, reflection=True) as address:
        yield address


def _client_token(env: dict, name: str, token: str) -> Path:
    path = env["dir"] / name
    _write_tokens(path, token)
    return path


def _rank(address: str, security: ClientSecurity | None, request) -> rank_pb2.RankResponse:
    user, items = request
    with rank_channel(address, security) as ch:
        stub = rank_pb2_grpc.RankingServiceStub(ch)
        return stub.Rank(rank_pb2.RankRequest(user_id=user, item_ids=items, request_id="sec"), timeout=TIMEOUT_S)


def _code(address: str, security: ClientSecurity | None, request) -> grpc.StatusCode:
    try:
        _rank(address, security, request)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _scored(resp: rank_pb2.RankResponse) -> int:
    return sum(it.status == rank_pb2.ITEM_STATUS_SCORED for it in resp.items)


def _unauthenticated() -> float:
    return REGISTRY.get_sample_value("hisam_serving_rank_requests_total", {"code": "UNAUTHENTICATED"}) or 0.0


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_refuses_plaintext_and_serves_a_client_that_trusts_the_ca(token_server, pki, sqlite_store) -> None:
    request = sqlite_store.requests[0]
    token = _client_token(token_server, "client-old", "old-token")
    assert _code(token_server["address"], ClientSecurity(auth_token_file=token), request) == grpc.StatusCode.UNAVAILABLE
    # TLS, but not trusting the server's CA: the handshake fails
    other = ClientSecurity(tls_ca=pki["other_ca"], auth_token_file=token)
    assert _code(token_server["address"], other, request) == grpc.StatusCode.UNAVAILABLE
    resp = _rank(token_server["address"], ClientSecurity(tls_ca=pki["ca"], auth_token_file=token), request)
    assert len(resp.items) == len(request[1]) and _scored(resp) > 0 and resp.request_id == "sec"


def test_mutual_tls_needs_a_client_certificate_from_the_ca(mtls_server, pki, sqlite_store) -> None:
    request = sqlite_store.requests[1]
    assert _code(mtls_server, ClientSecurity(tls_ca=pki["ca"]), request) == grpc.StatusCode.UNAVAILABLE
    foreign = ClientSecurity(pki["ca"], pki["other_client_cert"], pki["other_client_key"])
    assert _code(mtls_server, foreign, request) == grpc.StatusCode.UNAVAILABLE
    assert _code(mtls_server, None, request) == grpc.StatusCode.UNAVAILABLE  # plaintext
    good = ClientSecurity(pki["ca"], pki["client_cert"], pki["client_key"])
    resp = _rank(mtls_server, good, request)
    assert len(resp.items) == len(request[1]) and _scored(resp) > 0
    # the load helpers take the same options
    (row,) = rank_calls(mtls_server, [request], security=good)
    assert row["ok"], row


# --- tokens ---------------------------------------------------------------------------------------


def test_token_missing_or_wrong_is_unauthenticated_and_counted(token_server, pki, sqlite_store) -> None:
    address, request = token_server["address"], sqlite_store.requests[2]
    before = _unauthenticated()
    assert _code(address, ClientSecurity(tls_ca=pki["ca"]), request) == grpc.StatusCode.UNAUTHENTICATED
    wrong = _client_token(token_server, "client-wrong", "not-the-token")
    assert _code(address, ClientSecurity(tls_ca=pki["ca"], auth_token_file=wrong), request) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert _unauthenticated() - before == 2
    right = _client_token(token_server, "client-old", "old-token")
    resp = _rank(address, ClientSecurity(tls_ca=pki["ca"], auth_token_file=right), request)
    assert len(resp.items) == len(request[1])


def test_token_rotation_without_restart(token_server, pki, sqlite_store) -> None:
    address, request, tokens = token_server["address"], sqlite_store.requests[3], token_server["tokens"]
    old = ClientSecurity(tls_ca=pki["ca"], auth_token_file=_client_token(token_server, "client-old", "old-token"))
    new = ClientSecurity(tls_ca=pki["ca"], auth_token_file=_client_token(token_server, "client-new", "new-token"))
    try:
        assert _code(address, new, request) == grpc.StatusCode.UNAUTHENTICATED
        _write_tokens(tokens, "old-token", "new-token")  # the overlap: both work
        assert _code(address, old, request) == grpc.StatusCode.OK
        assert _code(address, new, request) == grpc.StatusCode.OK
        _write_tokens(tokens, "new-token")  # the old one retired
        assert _code(address, new, request) == grpc.StatusCode.OK
        assert _code(address, old, request) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        _write_tokens(tokens, "old-token")


def test_health_needs_no_token(token_server, pki) -> None:
    tls_only = ClientSecurity(tls_ca=pki["ca"])
    for service in ("", SERVICE_NAME, "liveness"):
        assert health_status(token_server["address"], TIMEOUT_S, service, security=tls_only) == "SERVING"


# --- reflection -----------------------------------------------------------------------------------


def _list_services(address: str, security: ClientSecurity) -> set[str]:
    with rank_channel(address, security) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S))
    return {s.name for s in resp.list_services_response.service}


def test_reflection_is_off_by_default(token_server, pki) -> None:
    token = _client_token(token_server, "client-old", "old-token")
    with pytest.raises(grpc.RpcError) as e:
        _list_services(token_server["address"], ClientSecurity(tls_ca=pki["ca"], auth_token_file=token))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_on_with_the_option(mtls_server, pki) -> None:
    names = _list_services(mtls_server, ClientSecurity(pki["ca"], pki["client_cert"], pki["client_key"]))
    assert {SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name} <= names


# --- configuration --------------------------------------------------------------------------------


def test_serve_options_build_the_server_security(pki, tmp_path) -> None:
    import argparse

    from hisam.jobs.serve import add_arguments, serve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tokens = tmp_path / "tokens"
    _write_tokens(tokens, "t")
    args = parser.parse_args(
        ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]), "--tls-client-ca", str(pki["ca"])]
        + ["--auth-token-file", str(tokens)]
    )
    config = serve_config(args)
    assert config.security == ServerSecurity(pki["server_cert"], pki["server_key"], pki["ca"], tokens)
    assert not config.reflection and serve_config(parser.parse_args(["--reflection"])).reflection
    with pytest.raises(ValueError, match="--tls-key"):
        ServerSecurity(tls_cert=pki["server_cert"])
    with pytest.raises(ValueError, match="--tls-ca"):
        ClientSecurity(tls_client_cert=pki["client_cert"], tls_client_key=pki["client_key"])


def test_plaintext_server_without_options_is_unchanged(model_repo, sqlite_store) -> None:
    """No option: plaintext, no token, as before (the health probe sees no difference)."""
    with _server(model_repo, sqlite_store, ServerSecurity()) as address:
        assert health_status(address, TIMEOUT_S, "liveness") == "SERVING"
        resp = _rank(address, None, sqlite_store.requests[4])
        assert len(resp.items) == len(sqlite_store.requests[4][1])


def test_token_file_sees_quick_same_size_rewrites_and_keeps_tokens_over_a_bad_read(tmp_path) -> None:
    from serving.security import TokenFile

    path = tmp_path / "tokens"
    path.write_text("aaaa\n")
    tokens = TokenFile(path)
    assert tokens.accepts("aaaa") and not tokens.accepts(None) and not tokens.accepts("")
    path.write_text("bbbb\n")  # in place, same size, within the same file-time tick
    assert tokens.accepts("bbbb") and not tokens.accepts("aaaa")
    path.write_text("")  # half-written: the tokens in force stay
    assert tokens.accepts("bbbb")
    path.unlink()
    assert tokens.accepts("bbbb")
    with pytest.raises(ValueError, match="no token"):
        (tmp_path / "empty").write_text("\n")
        TokenFile(tmp_path / "empty")


def test_hisam_serve_with_tls_and_a_token(model_repo, sqlite_store, pki, tmp_path) -> None:
    """The command's options reach the server: ``hisam serve`` as a process, reached through the load helpers."""
    from serving.load import serve_process

    tokens = tmp_path / "tokens"
    _write_tokens(tokens, "serve-token")
    args = ["--model-repo", str(model_repo), "--inference", "ort", *sqlite_store.args]
    args += ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"])]
    args += ["--auth-token-file", str(tokens)]
    security = ClientSecurity(tls_ca=pki["ca"], auth_token_file=tokens)
    with serve_process(args, tmp_path / "serve.log", timeout_s=120, security=security) as served:
        (row,) = rank_calls(served.address, sqlite_store.requests[:1], security=security)
        assert row["ok"], row
        assert _code(served.address, ClientSecurity(tls_ca=pki["ca"]), sqlite_store.requests[0]) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_hisam_rank_reaches_a_mutual_tls_server_with_the_client_options(mtls_server, pki, sqlite_store, capsys) -> None:
    """The `hisam rank` command takes the same client options (serving/security.py)."""
    import argparse

    from hisam.jobs import rank as rank_cmd

    user, items = sqlite_store.requests[0]
    parser = argparse.ArgumentParser()
    rank_cmd.add_arguments(parser)
    argv = [str(user), *map(str, items), "--address", mtls_server, "--timeout", str(TIMEOUT_S)]
    assert rank_cmd.main(parser.parse_args(argv)) == 2  # plaintext against a TLS port
    assert "Rank failed: UNAVAILABLE" in capsys.readouterr().err
    tls = ["--tls-ca", str(pki["ca"]), "--tls-client-cert", str(pki["client_cert"])]
    assert rank_cmd.main(parser.parse_args([*argv, *tls, "--tls-client-key", str(pki["client_key"])])) == 0
    out = capsys.readouterr().out
    assert f"user {user}:" in out and "scored" in out
