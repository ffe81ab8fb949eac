"""User deletion end to end (docs/design.md, Guarantees, "User deletion"), on each backend, all real:
a private broker, a stream worker process serving two namespaces (its own and an older
re-tokenisation namespace, ``--delete-also``), the online store (SQLite, or the private
Redis), a Rank server process (``hisam serve --inference ort --tombstones-bootstrap``), the
``hisam user delete`` command, and the near-line trainer service on the broker.

After ``hisam user delete A --wait``: no key or row of A remains in either namespace, B is
untouched in both; Rank answers A with ``history_len = 0`` and has dropped A's anchor cache
entry; A's late actions (a new one and a redelivery of one it had) are dropped and counted;
and the trainer, started afterwards on the pending samples, trains on B's and on none of A's.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import urllib.request
import uuid
from dataclasses import replace

import pytest

from features import encoding as enc
from features.store import ItemSids, OnlineStoreConfig, StreamAction, open_stream_store
from infra import observability as obs
from infra.ports import free_port
from infra.services import kafka_broker
from serving.load import rank_calls, serve_process
from stream import producer as prod
from stream import records as rec
from stream.testing import WorkerProcess, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.triton, pytest.mark.slow]

N_CODES, CODEBOOK, T = 6, 16, 20  # the tiny model's (tests/serving/conftest.py)
TOKENIZER = "tok-test-v1"  # trainer.testing.TOKENIZER: the trainer takes these samples
N_ITEMS = 12


def metrics(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return obs.parse_metrics(r.read().decode())


def traces(cfg: OnlineStoreConfig, user: int) -> list:
    """Every key (Redis: any key of the database holding the user's entity key) or row (SQLite: any
    table of the namespace's database with the user's entity key or id) of ``user``."""
    ek = enc.entity_key_bytes(enc.USER_ID_KEY, user)
    if cfg.backend == "redis":
        import redis

        return [k for k in redis.Redis.from_url(cfg.redis_url).scan_iter(count=1000) if ek in k]
    out = []
    with sqlite3.connect(cfg.sqlite_db) as db:
        for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            cols = [r[1] for r in db.execute(f'PRAGMA table_info("{t}")')]
            if "entity_key" in cols:
                out += [(t, "entity_key")] * db.execute(f'SELECT count(*) FROM "{t}" WHERE entity_key = ?', (ek,)).fetchone()[0]  # fmt: skip
    return out


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_user_deletion_end_to_end(backend, tmp_path, redis_url, model_repo, tiny_export) -> None:
    run = uuid.uuid4().hex[:8]
    base = 7_000_000_000 + (uuid.uuid4().int % 1_000_000) * 1000
    a, b = base + 1, base + 2
    cfg = OnlineStoreConfig(
        backend=backend, repo_dir=tmp_path / "repo", redis_url=redis_url if backend == "redis" else None,
        project=f"t_del_{run}", stream_len=T, n_codes=N_CODES,
    )  # fmt: skip
    old_cfg = replace(
        cfg, project=f"t_del_old_{run}", repo_dir=tmp_path / "repo_old" if backend == "sqlite" else cfg.repo_dir
    )
    also = old_cfg.project + (f"@{old_cfg.repo_dir}" if backend == "sqlite" else "")
    items = {base + 100 + i: tuple(layer * CODEBOOK + (i + layer) % CODEBOOK for layer in range(N_CODES)) for i in range(N_ITEMS)}  # fmt: skip
    # The older namespace (a re-tokenisation's source, kept for rollback) holds both users.
    old = open_stream_store(old_cfg)
    old.append_batch([StreamAction(u, f"old-{u}-{k}", base + 100 + k, 2, 1_000 + k, items[base + 100 + k]) for u in (a, b) for k in range(3)])  # fmt: skip
    old.close()
    store = open_stream_store(cfg)
    store.put_item_sids([ItemSids(i, t, TOKENIZER, 0) for i, t in items.items()])

    def stream(u: int) -> list[str]:
        (s,) = store.read_streams([u])
        return [] if s is None else s.event_ids

    def events(u: int, ks) -> list:
        return [rec.action_event(f"{run}-{u}-{k}", u, base + 100 + k % N_ITEMS, 2 + k % 4, 1_700_000_000_000 + k) for k in ks]  # fmt: skip

    with kafka_broker(data_dir=tmp_path / "kafka") as broker:
        bootstrap = broker.bootstrap
        worker_metrics = free_port()
        worker = WorkerProcess(
            [
                "--bootstrap", bootstrap, "--backend", backend, "--repo-dir", str(cfg.repo_dir), "--project", cfg.project,
                "--stream-len", str(T), "--n-codes", str(N_CODES), "--app-id", f"del-{run}", "--instance-id", f"del-{run}",
                "--within-ms", "5", "--delete-also", also, "--deletion-grace", "600",
                "--metrics-port", str(worker_metrics), *(["--redis-url", redis_url] if backend == "redis" else []),
            ],
            tmp_path / "worker.log",
        )  # fmt: skip
        worker.start()
        producer = prod.make_producer(bootstrap, linger_ms=2)
        try:
            prod.produce_actions(producer, events(a, range(5)) + events(b, range(5)))
            wait_until(lambda: len(stream(a)) == 5 and len(stream(b)) == 5, 120, 0.2, f"appends ({worker.log_path})")
            b_before = store.read_streams([b])[0]
            serve_metrics = free_port()
            args = ["--model-repo", str(model_repo), "--inference", "ort", "--metrics-port", str(serve_metrics)]
            args += ["--tombstones-bootstrap", bootstrap, "--backend", backend, "--repo-dir", str(cfg.repo_dir)]
            args += ["--project", cfg.project, "--stream-len", str(T), "--n-codes", str(N_CODES)]
            args += ["--redis-url", redis_url] if backend == "redis" else []
            with serve_process(args, tmp_path / "serve.log") as served:
                url = f"http://127.0.0.1:{serve_metrics}/metrics"
                first = rank_calls(served.address, [(a, list(items)), (a, list(items)), (b, list(items))])
                assert [r["history_len"] for r in first] == [5, 5, 5] and first[1]["cache_hit"], first
                assert metrics(url)[("hisam_serving_anchor_cache_entries", ())] == 2

                cmd = [sys.executable, "-m", "hisam.jobs.user_delete", str(a), "--bootstrap", bootstrap]
                cmd += ["--wait", "90", "--reason", "test"]
                done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
                assert done.returncode == 0, done.stdout + done.stderr + worker.log_tail()
                assert f"user {a}: deleted from {old_cfg.project}, {cfg.project}" in done.stdout, done.stdout

                # Nothing of A in any namespace; B untouched in both.
                assert traces(cfg, a) == [] and traces(old_cfg, a) == []
                assert store.read_streams([a]) == [None]
                assert stream(b) == b_before.event_ids
                old = open_stream_store(old_cfg)
                assert old.read_streams([a]) == [None] and len(old.read_streams([b])[0]) == 3
                old.close()
                # Rank: A from its profile alone, its cache entry dropped; B as before.
                wait_until(
                    lambda: metrics(url).get(("hisam_serving_anchor_cache_deletions_total", ()), 0) >= 1, 60, 0.2,
                    f"the Rank server's tombstone ({served.log_tail()})",
                )  # fmt: skip
                assert metrics(url)[("hisam_serving_anchor_cache_entries", ())] == 1
                after = rank_calls(served.address, [(a, list(items)), (b, list(items))])
                assert [r["history_len"] for r in after] == [0, 5], after

            # Late actions of A in its grace period (a new one, a redelivery of one it had), then one of B.
            prod.produce_actions(producer, events(a, [7]) + events(a, [0]) + events(b, [5]))
            wait_until(lambda: len(stream(b)) == 6, 60, 0.2, f"B's late action ({worker.log_path})")
            assert traces(cfg, a) == [] and traces(old_cfg, a) == []
            wm = metrics(f"http://127.0.0.1:{worker_metrics}/metrics")
            assert wm[("hisam_stream_actions_of_deleted_users_total", ())] == 2
            assert wm[("hisam_stream_tombstones_total", ())] == 1
            assert wm[("hisam_stream_users_deleted_total", (("project", cfg.project),))] == 1
            assert wm[("hisam_stream_users_deleted_total", (("project", old_cfg.project),))] == 1
            assert worker.alive(), worker.log_tail()
        finally:
            producer.close()
            worker.stop()
            store.close()

        # The trainer, started now on the pending samples: B's six, none of A's five.
        trained = _train_pending(bootstrap, tmp_path, model_repo, tiny_export, run)
        assert trained.counts["skipped_of_deleted_users"] == 5
        assert sorted(r[0] for r in trained.learner.window.rows) == [b] * 6
        assert trained.trained == 6


def _train_pending(bootstrap: str, tmp_path, model_repo, tiny_export, run: str):
    """The trainer service until the samples topic is idle; the warm start is the served model
    (adopted from a copy of its repository, so nothing is traced)."""
    from models.hmat.checkpoint import save_checkpoint
    from trainer.config import ServiceConfig, TrainerConfig
    from trainer.nearline import NearlineTrainer
    from trainer.service import TrainerService
    from trainer.testing import profile_of

    repo = tmp_path / "trainer_repo"
    shutil.copytree(model_repo, repo)
    ckpt = save_checkpoint(tmp_path / "warm", tiny_export.model, tokenizer_version=TOKENIZER, meta={"variant": "hmat"})
    trainer = NearlineTrainer.from_checkpoint(ckpt, profile_of, TrainerConfig(min_samples=10_000, window=10_000))
    cfg = ServiceConfig(
        bootstrap=bootstrap, state_dir=tmp_path / "state", repo=repo, group_id=f"trainer-{run}",
        max_records=64, max_wait_s=0.3, idle_exit_s=4,
    )  # fmt: skip
    svc = TrainerService(trainer, cfg)
    svc.run(threading.Event())
    return svc.trainer
