"""A real stream worker process appends through TLS and an ACL user (docs/operations.md
"Security: Redis"): ``--redis-url rediss://``, ``--redis-tls-ca``, a client certificate,
``--redis-username`` and ``--redis-password-file``; the password is in no argument."""

from __future__ import annotations

import uuid

import pytest
from pki import _cert, _key, _write_pair

from features.store import ItemSids, OnlineStoreConfig, open_stream_store
from infra.services import RedisTls, redis_server
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.testing import WorkerProcess, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

N_CODES = 6
RUN = uuid.uuid4().hex[:8]
BASE = 9_000_000_000 + (uuid.uuid4().int % 1_000_000) * 1000
USER, PASSWORD = "stream_worker", "pw-Worker-42c0"


def test_worker_appends_through_tls_and_acl(kafka_bootstrap, tmp_path) -> None:
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("hisam worker test CA", ca_key, ca=True)
    ca_file, _ = _write_pair(tmp_path, "ca", ca, ca_key)
    server_cert, server_keyf = _write_pair(tmp_path, "server", _cert("localhost", server_key, ca, ca_key, server=True), server_key)  # fmt: skip
    client_cert, client_keyf = _write_pair(tmp_path, "client", _cert("worker", client_key, ca, ca_key), client_key)
    secret = tmp_path / "redis_password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    project = f"t_worker_tls_{RUN}"
    tls = RedisTls(server_cert, server_keyf, ca_file, auth_clients="yes")
    with redis_server(acl_user=(USER, PASSWORD), tls=tls) as server:
        cfg = OnlineStoreConfig(
            backend="redis", repo_dir=tmp_path / "repo", redis_url=server.url, project=project, n_codes=N_CODES,
            redis_username=USER, redis_password_file=secret, redis_tls_ca=ca_file,
            redis_tls_cert=client_cert, redis_tls_key=client_keyf,
        )  # fmt: skip
        store = open_stream_store(cfg)
        store.put_item_sids([ItemSids(BASE + i, tuple(i * 10 + j for j in range(N_CODES)), "v", 0) for i in range(3)])
        tp.ensure_topics(kafka_bootstrap, tp.default_topics(4))
        worker = WorkerProcess(
            [
                "--bootstrap", kafka_bootstrap, "--backend", "redis", "--redis-url", server.url,
                "--redis-username", USER, "--redis-password-file", str(secret), "--redis-tls-ca", str(ca_file),
                "--redis-tls-cert", str(client_cert), "--redis-tls-key", str(client_keyf),
                "--repo-dir", str(tmp_path / "repo"), "--project", project, "--n-codes", str(N_CODES),
                "--app-id", f"hisam-redis-tls-{RUN}", "--instance-id", f"tls-{RUN}", "--within-ms", "5",
            ],
            tmp_path / "worker.log",
        )  # fmt: skip
        worker.start()
        producer = prod.make_producer(kafka_bootstrap, linger_ms=2)
        try:
            user = BASE + 1
            evs = [rec.action_event(f"{RUN}-tls-{k}", user, BASE + k % 3, 1, 1_700_000_000_000 + k) for k in range(5)]
            prod.produce_actions(producer, evs)

            def stream() -> list[str]:
                (s,) = store.read_streams([user])
                return [] if s is None else s.event_ids

            want = [e.event_id for e in evs]
            wait_until(lambda: stream() == want, 90, 0.2, f"the worker's appends ({worker.log_path})")
            assert worker.alive(), worker.log_tail()
            assert PASSWORD not in " ".join(worker.args)
        finally:
            producer.close()
            worker.stop()
            store.close()
