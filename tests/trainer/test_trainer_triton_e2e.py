"""Acceptance (issue 6): samples replayed through the broker while the trainer runs; Triton serves its versions.

Real pieces: the broker, a private Redis holding the online store Rank reads, ``tritonserver``
on the model repository, the gRPC Rank server (in a thread), and ``hisam trainer run`` as a
child process. Training samples are synthetic but learnable (trainer/testing.py) and
travel through the training-samples topic; the ML-100K replay with the stream worker is the
benchmark's (``hisam bench trainer``), too slow for CI on two cores.

Checked: a new version is published by the gate and served by Triton (Rank answers with
its content version), the trainer kept training while Triton loaded it (the publish
completes in the background), no Rank call fails while Triton swaps versions, and a
corrupted candidate (fault injection right after that publish) is refused and never served.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from export.template import Template
from features.store import OnlineStoreConfig, open_stream_store
from infra.triton import triton_server
from models.hmat.checkpoint import load_checkpoint
from serving.backends import TritonBackend
from serving.load import RankProbe
from serving.online import OnlineReader
from serving.profiles import Profiles
from serving.ranking import Ranker, model_info
from serving.repository import publish_version, published_versions
from serving.server import rank_server_thread
from stream import topics as tp
from stream.testing import REPO_ROOT, wait_until
from trainer import samples as sm
from trainer.testing import CODEBOOK, N_CODES, TOKENIZER, synthetic_examples, tiny_config

pytestmark = [pytest.mark.triton, pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

BASE = (int(time.time()) % 100_000) * 10_000 + 7_000_000  # ids unique per run (a shared Redis may hold others)


def _lineage(state_dir) -> list[dict]:
    path = state_dir / "lineage.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_replay_publishes_a_served_version_without_failed_calls_and_refuses_a_corrupted_one(
    tmp_path, warm_checkpoint, template_dir, kafka_bootstrap, redis_url, seed_rank_store
) -> None:
    run = uuid.uuid4().hex[:8]
    topic, dead = f"ts-e2e-{run}", f"dl-e2e-{run}"
    tp.ensure_topics(kafka_bootstrap, [tp.TopicSpec(topic, 2), tp.TopicSpec(dead, 1)])
    repo, state = tmp_path / "repo", tmp_path / "state"
    # The serving version 1: the warm start, published as the trainer would (it adopts it).
    warm, _ = load_checkpoint(warm_checkpoint)
    publish_version(repo, Template.load_or_build(tiny_config(), template_dir).render(warm, TOKENIZER))
    # The online store Rank reads: items and one user's stream.
    cfg = OnlineStoreConfig(
        backend="redis", redis_url=redis_url, repo_dir=tmp_path / "fr", stream_len=20, n_codes=N_CODES
    )
    store = open_stream_store(cfg)
    events = synthetic_examples(768, seed=7, prefix=f"e2e-{run}")
    user, candidates = seed_rank_store(store, events, BASE, run)

    with triton_server(repo, poll_s=1.0) as triton:

        def make_ranker() -> Ranker:
            return Ranker(
                TritonBackend(triton.url), OnlineReader(open_stream_store(cfg)), Profiles.empty(), model_info(repo)
            )

        with rank_server_thread(make_ranker) as handle:
            probe = RankProbe(handle.address, user, candidates)
            probe.start()
            wait_until(lambda: probe.versions, 60, 0.1, "the first Rank answer")
            v1 = probe.versions[0]
            args = [
                sys.executable, "-m", "hisam.jobs.trainer_run", "--checkpoint", str(warm_checkpoint),
                "--state-dir", str(state), "--model-repo", str(repo), "--bootstrap", kafka_bootstrap,
                "--group-id", f"trainer-{run}", "--topic", topic, "--dead-letter-topic", dead,
                "--triton-url", triton.url, "--template-dir", str(template_dir), "--threads", "1",
                "--lr", "3e-3", "--ema", "0", "--batch-size", "32", "--max-records", "32", "--max-wait", "0.3",
                "--window", "400", "--min-samples", "96", "--gate-window", "192", "--probation", "100000",
            ]  # fmt: skip
            env = {
                **os.environ,
                "PYTHONWARNINGS": "ignore::DeprecationWarning",
                "HISAM_FAULT_CORRUPT_AFTER_PUBLISHES": "1",
            }
            log_path = tmp_path / "trainer.log"
            with open(log_path, "w") as out:
                proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                from infra.kafka import KafkaProducer

                producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")

                def replay(part) -> None:  # while the trainer runs
                    for e in part:
                        producer.send(topic, key=str(e.user_id).encode(), value=sm.sample_bytes(e, TOKENIZER, CODEBOOK))
                    producer.flush()

                replay(events[:512])  # the trainer publishes within these and may train through all of them meanwhile

                def published() -> dict | None:
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    return next((r for r in _lineage(state) if r["event"] == "published"), None)

                rec = wait_until(published, 240, 0.2, "a published version")
                assert rec["version"] == 2 and rec["parent"] == 1 and rec["publish_latency_s"] is not None
                assert rec["gate"]["paired"]["lower"] >= 0 and rec["served_s"] > 0
                assert rec["trained_while_loading"] > 0, rec  # the loop trained on while Triton loaded version 2
                wait_until(lambda: probe.versions[-1] == rec["model_version"], 60, 0.1, "Rank answering with version 2")
                replay(events[512:])  # what the corrupted candidate is judged on
                producer.close()

                def refused() -> dict | None:  # after the publish, i.e. of the corrupted candidate
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    lineage = _lineage(state)
                    after = lineage[next(i for i, r in enumerate(lineage) if r["event"] == "published") :]
                    return next((r for r in after if r["event"] == "refused"), None)

                bad = wait_until(refused, 240, 0.2, "the gate refusing the corrupted candidate")
                assert bad["reason"] == "below_serving", bad
                time.sleep(1.5)  # a Triton poll period: nothing new may appear
            finally:
                proc.terminate()
                proc.wait(30)
                probe.close()
            assert probe.failures == [], probe.failures[:5]
            after_refusal = [r for r in _lineage(state) if r["event"] == "published" and r["version"] > 2]
            if not after_refusal:  # the corrupted candidate never reached the repository
                assert sorted(published_versions(repo)) == [1, 2]
            assert set(probe.versions) <= {v1, rec["model_version"], *(r["model_version"] for r in after_refusal)}
            assert probe.versions[-1] in {rec["model_version"], *(r["model_version"] for r in after_refusal)}
    store.close()
