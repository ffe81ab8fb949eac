"""Redis with an ACL user and with TLS (docs/operations.md "Security: Redis").

Real redis-servers (infra/services.py ``redis_server``): one with an ACL user and the
``default`` user off, one serving TLS only (certificates made here, tests/security/pki.py)
with the same kind of ACL user. The direct store (features/store/redis.py) and Feast's
reads (``feast_read_streams`` through the generated feature_store.yaml) take the same
``OnlineStoreConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pki import _cert, _key, _write_pair

from features.store import (
    OnlineStoreConfig,
    StreamAction,
    feast_read_streams,
    open_feature_store,
    open_stream_store,
)
from infra.services import RedisServer, RedisTls, redis_server

N_CODES = 6
USER = "hisam_app"
PASSWORD = "pw-Acl-7f3e9c1d"

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate from it."""
    d = tmp_path_factory.mktemp("redis_pki")
    ca_key = _key()
    ca = _cert("hisam redis test CA", ca_key, ca=True)
    out = {}
    out["ca"], _ = _write_pair(d, "ca", ca, ca_key)
    server_key = _key()
    out["server_cert"], out["server_key"] = _write_pair(
        d, "server", _cert("localhost", server_key, ca, ca_key, server=True), server_key
    )
    client_key = _key()
    out["client_cert"], out["client_key"] = _write_pair(
        d, "client", _cert("client", client_key, ca, ca_key), client_key
    )
    return out


@pytest.fixture(scope="module")
def password_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "redis_password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    with redis_server(acl_user=(USER, PASSWORD)) as server:
        yield server


@pytest.fixture(scope="module")
def tls_redis(certs) -> Iterator[RedisServer]:
    tls = RedisTls(certs["server_cert"], certs["server_key"], certs["ca"], auth_clients="optional")
    with redis_server(acl_user=(USER, PASSWORD), tls=tls) as server:
        yield server


def _config(tmp_path: Path, url: str, **kw) -> OnlineStoreConfig:
    kw.setdefault("redis_socket_timeout_s", 3.0)
    return OnlineStoreConfig(
        backend="redis", repo_dir=tmp_path / "repo", redis_url=url, project="t_redis_sec", n_codes=N_CODES, **kw
    )


def _action(user: int, k: int) -> StreamAction:
    return StreamAction(
        user_id=user,
        event_id=f"u{user}-e{k}",
        item_id=k,
        action=k % 4,
        event_time_ms=1_700_000_000_000 + k,
        item_tokens=tuple(k * 10 + j for j in range(N_CODES)),
    )


def _append_and_read_both_ways(cfg: OnlineStoreConfig, user: int) -> None:
    """Append through the direct store; read back directly and through Feast; the yaml holds no password."""
    store = open_stream_store(cfg)
    try:
        assert all(r.appended for r in store.append_batch([_action(user, k) for k in range(4)]))
        (direct,) = store.read_streams([user])
    finally:
        store.close()
    assert direct.event_ids == [f"u{user}-e{k}" for k in range(4)]
    fs = open_feature_store(cfg)
    (via_feast,) = feast_read_streams(fs, [user], N_CODES)
    assert via_feast.event_ids == direct.event_ids
    yaml = Path(cfg.repo_dir) / "feature_store.yaml"
    assert PASSWORD not in yaml.read_text()
    assert stat.S_IMODE(yaml.stat().st_mode) == 0o600
    conn = json.loads(yaml.read_text())["online_store"]["connection_string"]
    assert "password=${HISAM_FEAST_REDIS_PASSWORD}" in conn and f"username={USER}" in conn


def test_acl_user_from_password_file(acl_redis, password_file, tmp_path) -> None:
    cfg = _config(tmp_path, acl_redis.url, redis_username=USER, redis_password_file=password_file)
    _append_and_read_both_ways(cfg, 11)


def test_acl_user_and_password_in_the_url(acl_redis, tmp_path) -> None:
    url = acl_redis.url.replace("redis://", f"redis://{USER}:{PASSWORD}@")
    _append_and_read_both_ways(_config(tmp_path, url), 12)


def test_wrong_password_is_refused_naming_user_and_server(acl_redis, tmp_path) -> None:
    bad = tmp_path / "bad_password"
    bad.write_text("not-the-password-93b1")
    cfg = _config(tmp_path, acl_redis.url, redis_username=USER, redis_password_file=bad)
    with pytest.raises(redis.exceptions.AuthenticationError) as e:
        open_stream_store(cfg)
    msg = str(e.value)
    assert USER in msg and f"{acl_redis.host}:{acl_redis.port}" in msg
    assert "not-the-password-93b1" not in msg and PASSWORD not in msg


def test_default_user_has_no_access(acl_redis, tmp_path) -> None:
    with pytest.raises(redis.exceptions.AuthenticationError, match="'default'"):
        open_stream_store(_config(tmp_path, acl_redis.url))


def test_rotated_password_file_is_read_for_new_connections(acl_redis, tmp_path) -> None:
    secret = tmp_path / "rotating"
    secret.write_text(PASSWORD)
    cfg = _config(tmp_path, acl_redis.url, redis_username=USER, redis_password_file=secret)
    store = open_stream_store(cfg)
    admin = redis.Redis(host=acl_redis.host, port=acl_redis.port, username=USER, password=PASSWORD)
    try:
        admin.acl_setuser(USER, enabled=True, passwords=["+rotated-pw-55aa"])  # old and new both valid
        secret.write_text("rotated-pw-55aa\n")
        admin.acl_setuser(USER, enabled=True, passwords=[f"-{PASSWORD}"])  # the old one retired
        store._client.connection_pool.disconnect()  # the next call opens a new connection
        assert store.append(_action(13, 0)).appended
    finally:
        store.close()
        fixer = redis.Redis(host=acl_redis.host, port=acl_redis.port, username=USER, password="rotated-pw-55aa")
        fixer.acl_setuser(USER, enabled=True, passwords=[f"+{PASSWORD}", "-rotated-pw-55aa"])
        fixer.close()
        admin.close()


def test_tls_with_private_ca(tls_redis, certs, password_file, tmp_path) -> None:
    assert tls_redis.url.startswith("rediss://")
    cfg = _config(
        tmp_path, tls_redis.url, redis_username=USER, redis_password_file=password_file, redis_tls_ca=certs["ca"]
    )
    _append_and_read_both_ways(cfg, 21)


def test_tls_with_client_certificate(tls_redis, certs, password_file, tmp_path) -> None:
    cfg = _config(
        tmp_path,
        tls_redis.url,
        redis_username=USER,
        redis_password_file=password_file,
        redis_tls_ca=certs["ca"],
        redis_tls_cert=certs["client_cert"],
        redis_tls_key=certs["client_key"],
    )
    _append_and_read_both_ways(cfg, 22)


def test_plaintext_client_against_the_tls_port_fails_clearly(tls_redis, password_file, tmp_path) -> None:
    plain = tls_redis.url.replace("rediss://", "redis://")
    cfg = _config(tmp_path, plain, redis_username=USER, redis_password_file=password_file, redis_socket_timeout_s=2.0)
    with pytest.raises(redis.exceptions.ConnectionError) as e:
        open_stream_store(cfg)
    assert f"{tls_redis.host}:{tls_redis.port}" in str(e.value) and "rediss://" in str(e.value)


def test_tls_without_the_ca_does_not_trust_the_server(tls_redis, password_file, tmp_path) -> None:
    cfg = _config(tmp_path, tls_redis.url, redis_username=USER, redis_password_file=password_file)
    with pytest.raises(redis.exceptions.ConnectionError, match="TLS"):
        open_stream_store(cfg)


def test_tls_files_need_rediss_and_feast_refuses_what_it_cannot_carry(acl_redis, tmp_path) -> None:
    with pytest.raises(ValueError, match="rediss://"):
        _config(tmp_path, acl_redis.url, redis_tls_ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="together"):
        _config(tmp_path, "rediss://127.0.0.1:1/0", redis_tls_cert=tmp_path / "c.pem")
    bad = tmp_path / "comma_password"
    bad.write_text("a,b")
    cfg = _config(tmp_path, acl_redis.url, redis_username=USER, redis_password_file=bad)
    with pytest.raises(ValueError, match="Feast's Redis connection_string cannot carry this password"):
        open_feature_store(cfg, apply=False)
    with pytest.raises(ValueError, match="username"):
        dataclasses.replace(cfg, redis_username="12345").feast_online_store()
