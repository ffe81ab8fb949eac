"""The trainer killed in the middle of a publish: nothing half-published serves, Rank never fails.

Real pieces: the broker, a private Redis for the online store Rank reads, ``tritonserver``
polling the model repository, the gRPC Rank server, and ``hisam trainer run`` as a child
process. The trainer trains on learnable synthetic samples until its gate passes, and dies
(``HISAM_FAULT_EXIT_IN_PUBLISH=first_moved``: ``os._exit`` right after the first model's new
version was renamed into place, the worst moment). Then:

- the repository counts no new version, and every Rank answer came from one complete model
  (the version served before);
- the trainer restarted without the fault resumes from its durable state, repairs the
  repository and publishes a later version number that Triton serves and Rank answers with;
- no Rank call failed at any point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from export.template import Template
from features.store import OnlineStoreConfig, open_stream_store
from infra.triton import triton_server
from models.hmat.checkpoint import load_checkpoint, save_checkpoint
from serving.backends import TritonBackend
from serving.load import RankProbe
from serving.online import OnlineReader
from serving.profiles import Profiles
from serving.ranking import Ranker, model_info
from serving.repository import FAULT_ENV, GRAPH_MODELS, publish_version, published_versions
from serving.server import rank_server_thread
from stream import topics as tp
from stream.testing import REPO_ROOT, wait_until
from trainer import samples as sm
from trainer.testing import CODEBOOK, N_CODES, TOKENIZER, synthetic_examples, tiny_config, warm_model

pytestmark = [pytest.mark.triton, pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def template_dir(build_cache):
    root = build_cache("hisam-trainer-onnx")  # shared with tests/trainer (same key, same cache)
    Template.load_or_build(tiny_config(), root)
    return root


def _lineage(state_dir) -> list[dict]:
    path = state_dir / "lineage.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _trainer(args: list[str], log_path, fault: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    with open(log_path, "a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "hisam.jobs.trainer_run", *args],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_trainer_killed_mid_publish_leaves_nothing_half_served_and_recovers(
    tmp_path, template_dir, kafka_bootstrap, redis_url, seed_rank_store
) -> None:
    run = uuid.uuid4().hex[:8]
    base = 8_000_000 + (int(run, 16) % 100_000) * 100  # ids unique per run (the session's Redis is shared)
    topic, dead = f"ts-kill-{run}", f"dl-kill-{run}"
    tp.ensure_topics(kafka_bootstrap, [tp.TopicSpec(topic, 2), tp.TopicSpec(dead, 1)])
    repo, state = tmp_path / "repo", tmp_path / "state"
    warm_checkpoint = save_checkpoint(
        tmp_path / "warm", warm_model(), tokenizer_version=TOKENIZER, meta={"variant": "hmat"}
    )
    warm, _ = load_checkpoint(warm_checkpoint)
    publish_version(repo, Template.load_or_build(tiny_config(), template_dir).render(warm, TOKENIZER))
    cfg = OnlineStoreConfig(
        backend="redis", redis_url=redis_url, repo_dir=tmp_path / "fr", stream_len=20, n_codes=N_CODES
    )
    store = open_stream_store(cfg)
    events = synthetic_examples(768, seed=11, prefix=f"kill-{run}")
    user, candidates = seed_rank_store(store, events, base, run)
    args = [
        "--checkpoint", str(warm_checkpoint), "--state-dir", str(state), "--model-repo", str(repo),
        "--bootstrap", kafka_bootstrap, "--group-id", f"trainer-{run}", "--topic", topic,
        "--dead-letter-topic", dead, "--template-dir", str(template_dir), "--threads", "1",
        "--lr", "3e-3", "--batch-size", "32", "--max-records", "32", "--max-wait", "0.3",
        "--window", "400", "--min-samples", "96", "--gate-window", "96", "--probation", "100000",
    ]  # fmt: skip

    with triton_server(repo, poll_s=0.5) as triton:
        args += ["--triton-url", triton.url]

        def make_ranker() -> Ranker:
            return Ranker(
                TritonBackend(triton.url), OnlineReader(open_stream_store(cfg)), Profiles.empty(), model_info(repo)
            )

        with rank_server_thread(make_ranker) as handle:
            probe = RankProbe(handle.address, user, candidates).start()
            try:
                wait_until(lambda: probe.versions, 60, 0.1, "the first Rank answer")
                v1 = probe.versions[0]
                from stream.producer import make_producer

                producer = make_producer(kafka_bootstrap)
                for e in events:
                    producer.send(topic, key=str(e.user_id).encode(), value=sm.sample_bytes(e, TOKENIZER, CODEBOOK))
                producer.flush()
                producer.close()

                first = _trainer(args, tmp_path / "trainer.log", fault="first_moved")
                code = first.wait(600)
                log_text = (tmp_path / "trainer.log").read_text()
                assert code == 137, f"the trainer was to die mid-publish (exit {code}):\n{log_text[-3000:]}"
                assert "fault injection" in log_text
                # Half-way: one model has the new version, the others do not; it does not count.
                assert published_versions(repo) == {1: v1}
                assert [d.name for d in (repo / GRAPH_MODELS["encode_history"]).iterdir() if d.name.isdigit()]
                n_dead = len(probe.versions)
                wait_until(lambda: len(probe.versions) >= n_dead + 20, 60, 0.1, "Rank answers after the crash")
                assert set(probe.versions) == {v1}, "an answer came from the half-published version"

                second = _trainer(args, tmp_path / "trainer.log", fault=None)
                try:

                    def republished() -> dict | None:
                        assert second.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
                        return next((r for r in _lineage(state) if r["event"] == "published"), None)

                    rec = wait_until(republished, 400, 0.2, "a version published after the restart")
                    assert rec["version"] == 3 and rec["parent"] == 1, rec  # number 2 was seen by Triton: skipped
                    wait_until(lambda: probe.versions[-1] == rec["model_version"], 60, 0.1, "Rank on version 3")
                finally:
                    second.terminate()
                    second.wait(60)
            finally:
                probe.close()
            assert probe.failures == [], probe.failures[:5]
            assert sorted(published_versions(repo)) == [1, 3]
            assert set(probe.versions) <= {v1, rec["model_version"]}
            assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    store.close()
