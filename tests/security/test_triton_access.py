"""Triton's restricted APIs and gRPC TLS (infra/triton_access.py, docs/operations.md "Security: Triton").

Real components: ``tritonserver`` 2.51 on the tiny model's repository, started with a client key
(inference, metadata), an admin key (repository, config, statistics, trace, logging,
shared memory) and mutual TLS on its gRPC port; certificates made here with ``cryptography``.
Checked: who gets what on gRPC and HTTP, health open for probes, plaintext and certificate-less
clients refused; then the Rank server (``hisam serve --triton-url``) and the trainer's Triton
watch through it with their command options, and a Rank server without the key refused with a
message that names the restriction.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import _cert, _key, _write_pair

from infra.triton_access import ADMIN_HEADER, CLIENT_HEADER, GRPC_PREFIX, TritonAccess

pytestmark = [pytest.mark.triton, pytest.mark.slow]

TIMEOUT_S = 10.0
MODEL = "hmat_ranking"


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("triton_pki")
    ca_key = _key()
    ca = _cert("hisam triton test CA", ca_key, ca=True)
    out = {"dir": d}
    out["ca"], _ = _write_pair(d, "ca", ca, ca_key)
    server_key = _key()
    out["server_cert"], out["server_key"] = _write_pair(
        d, "server", _cert("localhost", server_key, ca, ca_key, server=True), server_key
    )
    client_key = _key()
    out["client_cert"], out["client_key"] = _write_pair(d, "client", _cert("rank", client_key, ca, ca_key), client_key)
    for name, value in (("key", "client-key-1"), ("admin_key", "admin-key-1"), ("wrong_key", "not-the-key")):
        out[name] = d / name
        out[name].write_text(value + "\n")
    return out


@pytest.fixture(scope="module")
def triton(model_repo, creds, tmp_path_factory) -> Iterator:
    from infra.triton import triton_server

    access = TritonAccess(
        key_file=creds["key"],
        admin_key_file=creds["admin_key"],
        tls_cert=creds["server_cert"],
        tls_key=creds["server_key"],
        tls_client_ca=creds["ca"],
    )
    with triton_server(model_repo, log_dir=tmp_path_factory.mktemp("triton_log"), access=access) as server:
        yield server


def _client(triton, creds, *, tls: bool = True, cert: bool = True):
    import tritonclient.grpc as grpcclient

    access = TritonAccess(
        tls_ca=creds["ca"] if tls else None,
        client_cert=creds["client_cert"] if tls and cert else None,
        client_key=creds["client_key"] if tls and cert else None,
    )
    return grpcclient.InferenceServerClient(triton.url, **access.client_kwargs())


def _refused(call) -> str:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value)


def test_client_key_opens_inference_and_metadata_admin_key_the_rest(triton, creds) -> None:
    client = _client(triton, creds)
    key = {GRPC_PREFIX + CLIENT_HEADER: "client-key-1"}
    admin = {GRPC_PREFIX + ADMIN_HEADER: "admin-key-1"}
    try:
        # health: open to every caller that speaks TLS (probes carry no key)
        assert client.is_model_ready(MODEL, client_timeout=TIMEOUT_S)
        # metadata (and inference, below through the Rank server): the client key only
        msg = _refused(lambda: client.get_model_metadata(MODEL, client_timeout=TIMEOUT_S))
        assert CLIENT_HEADER in msg, msg
        assert _refused(lambda: client.get_model_metadata(MODEL, headers={GRPC_PREFIX + CLIENT_HEADER: "not-the-key"}))
        assert client.get_model_metadata(MODEL, headers=key, client_timeout=TIMEOUT_S).name == MODEL
        # repository, config, statistics, trace, logging: the admin key only, not the client key
        admin_calls = {
            "repository index": lambda h: client.get_model_repository_index(headers=h),
            "model config": lambda h: client.get_model_config(MODEL, headers=h),
            "statistics": lambda h: client.get_inference_statistics(MODEL, headers=h),
            "trace settings": lambda h: client.get_trace_settings(headers=h),
            "log settings": lambda h: client.get_log_settings(headers=h),
            "unload": lambda h: client.unload_model(MODEL, headers=h),
        }
        for name, call in admin_calls.items():
            if name == "unload":
                continue  # only its refusal is checked: an unload would take the model away
            for headers in (None, key):
                msg = _refused(lambda c=call, h=headers: c(h))
                assert ADMIN_HEADER in msg, (name, msg)
            call(admin)  # the holder of the admin key gets an answer
        for headers in (None, key):
            assert ADMIN_HEADER in _refused(lambda h=headers: admin_calls["unload"](h))
        assert client.is_model_ready(MODEL, client_timeout=TIMEOUT_S)  # still loaded
    finally:
        client.close()


def test_http_port_restricts_the_same_apis_and_leaves_health_open(triton) -> None:
    def status(path: str, headers: dict | None = None, method: str = "GET") -> int:
        req = urllib.request.Request(f"{triton.http_url}{path}", headers=headers or {}, method=method)
        if method == "POST":
            req.data = b"{}"
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status("/v2/health/ready") == 200
    assert status(f"/v2/models/{MODEL}/ready") == 200
    assert status(f"/v2/models/{MODEL}") >= 400  # metadata
    assert status(f"/v2/models/{MODEL}", {CLIENT_HEADER: "client-key-1"}) == 200
    assert status("/v2/repository/index", method="POST") >= 400
    assert status("/v2/repository/index", {CLIENT_HEADER: "client-key-1"}, method="POST") >= 400
    assert status("/v2/repository/index", {ADMIN_HEADER: "admin-key-1"}, method="POST") == 200
    assert status("/v2/logging") >= 400
    assert status("/v2/logging", {ADMIN_HEADER: "admin-key-1"}) == 200


def test_plaintext_and_certificate_less_clients_are_refused(triton, creds) -> None:
    from infra.triton import models_ready

    for kind in ({"tls": False}, {"cert": False}):
        client = _client(triton, creds, **kind)
        try:
            assert _refused(lambda c=client: c.is_model_ready(MODEL, client_timeout=TIMEOUT_S)), kind
        finally:
            client.close()
    ok, why = models_ready(triton.url, [MODEL], 1, TIMEOUT_S)
    assert not ok and why, why  # the trainer's watch without TLS options: not ready, and why
    full = TritonAccess(
        key_file=creds["key"], tls_ca=creds["ca"], client_cert=creds["client_cert"], client_key=creds["client_key"]
    )
    assert models_ready(triton.url, [MODEL], 1, TIMEOUT_S, full) == (True, "")


def test_rank_server_and_trainer_options_reach_the_restricted_triton(
    triton, creds, model_repo, sqlite_store, tmp_path
) -> None:
    import argparse

    from hisam.jobs import trainer_run
    from serving.load import rank_calls, serve_process
    from trainer.publisher import TritonWatch

    tls = ["--triton-tls-ca", str(creds["ca"]), "--triton-tls-cert", str(creds["client_cert"])]
    tls += ["--triton-tls-key", str(creds["client_key"])]
    base = ["--model-repo", str(model_repo), "--triton-url", triton.url, "--health-interval", "0.2", *sqlite_store.args]
    requests = sqlite_store.requests[:4]
    with serve_process([*base, *tls, "--triton-key-file", str(creds["key"])], tmp_path / "ok.log") as served:
        rows = rank_calls(served.address, requests)
        assert all(r["ok"] for r in rows), rows
    # the wrong key: health is SERVING (readiness is open) but every Rank call is refused, and says why
    with serve_process([*base, *tls, "--triton-key-file", str(creds["wrong_key"])], tmp_path / "bad.log") as served:
        rows = rank_calls(served.address, requests[:1])
        assert rows[0]["error"].startswith("INTERNAL"), rows  # not UNAVAILABLE: retrying would not help
        assert CLIENT_HEADER in served.log_tail(), served.log_tail()[-2000:]

    parser = argparse.ArgumentParser()
    trainer_run.add_arguments(parser)
    args = parser.parse_args(["--triton-url", triton.url, *tls, "--triton-key-file", str(creds["key"])])
    watch = TritonWatch(triton.url, access=trainer_run.client_access_from_args(args))
    assert watch.serving(1)
    assert watch.wait_serving(1, TIMEOUT_S) >= 0.0
    assert not TritonWatch(triton.url).serving(1)  # no TLS options: not serving, as far as it can tell


def test_access_refuses_bad_settings(creds, tmp_path) -> None:
    with pytest.raises(ValueError, match="go together"):
        TritonAccess(tls_cert=creds["server_cert"])
    with pytest.raises(ValueError, match="needs tls_cert"):
        TritonAccess(tls_client_ca=creds["ca"])
    with pytest.raises(ValueError, match="needs tls_ca"):
        TritonAccess(client_cert=creds["client_cert"], client_key=creds["client_key"])
    bad = tmp_path / "bad"
    bad.write_text("a:b=c\n")
    with pytest.raises(ValueError, match="without spaces"):
        TritonAccess(key_file=bad)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        TritonAccess(key_file=tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        TritonAccess(admin_key_file=tmp_path / "missing")
    args = TritonAccess(key_file=creds["key"], admin_key_file=creds["admin_key"]).server_args()
    assert f"--grpc-restricted-protocol=inference,metadata:{CLIENT_HEADER}=client-key-1" in args
    assert any(a.startswith("--http-restricted-api=model-repository,") for a in args)
    assert TritonAccess().server_args() == [] and TritonAccess().headers() is None
