"""The trainer service: gated publish into a real model repository, and the Kafka loop on the real broker.

Publishing here writes real Triton repository versions (serving/repository.py) from the
traced template; Triton itself is exercised in test_trainer_triton_e2e.py.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import pytest

from hisam_pb.v1 import events_pb2 as pb
from infra import observability as obs
from models.hmat.checkpoint import save_checkpoint
from serving.repository import published_versions
from stream import topics as tp
from stream.testing import consume_all
from trainer import samples as sm
from trainer.config import ServiceConfig, TrainerConfig
from trainer.faults import corrupt
from trainer.nearline import NearlineTrainer
from trainer.publisher import rollback_to
from trainer.service import TrainerService
from trainer.status import status
from trainer.testing import CODEBOOK, TOKENIZER, profile_of, synthetic_examples, tiny_trainer


def published_version_gauge() -> float | None:
    """``hisam_trainer_published_version`` as a scrape reads it."""
    from prometheus_client import REGISTRY, generate_latest

    page = obs.parse_metrics(generate_latest(REGISTRY).decode())
    return page.get(("hisam_trainer_published_version", ()))


def make_service(tmp_path, warm_checkpoint, template_dir, **kw) -> TrainerService:
    tcfg = {
        "lr": 3e-3,
        "ema": 0.0,
        "batch_size": 32,
        "window": 400,
        "min_samples": 96,
        "gate_window": 96,
        "probation": 10_000,
    }
    tcfg |= kw.pop("trainer", {})
    trainer = NearlineTrainer.from_checkpoint(warm_checkpoint, profile_of, TrainerConfig(**tcfg))
    cfg = ServiceConfig(
        bootstrap=kw.pop("bootstrap", "unused:0"),
        state_dir=tmp_path / "state",
        repo=tmp_path / "repo",
        template_dir=template_dir,
        **kw,
    )
    return TrainerService(trainer, cfg)


def test_gate_publishes_records_lineage_refuses_broken_candidates_and_follows_rollback(
    tmp_path, warm_checkpoint, template_dir
) -> None:
    svc = make_service(tmp_path, warm_checkpoint, template_dir)
    svc.restore_or_bootstrap()
    repo, t = svc.cfg.repo, svc.trainer
    assert sorted(published_versions(repo)) == [1] and t.serving_version == 1
    assert published_version_gauge() == 1
    events = synthetic_examples(640, seed=5)
    end = 0
    while t.serving_version == 1 and end < 544:  # the gate waits until the candidate is better beyond noise
        t.process(events[end : end + 32])
        end += 32
        t.offsets = {"training-samples:0": end}
        svc.step()
    assert sorted(published_versions(repo)) == [1, 2] and t.serving_version == 2
    assert published_version_gauge() == 2
    rec = [r for r in svc.state.lineage() if r["event"] == "published"][-1]
    assert rec["parent"] == 1 and rec["offsets"]["training-samples:0"] == end  # what it had trained on
    gate = rec["gate"]
    assert rec["parity_max_abs"] < 1e-4 and gate["paired"]["lower"] >= 0 and gate["paired"]["n"] == gate["rows"]
    assert gate["paired"]["diff"] == pytest.approx(gate["candidate"]["auc"] - gate["serving"]["auc"])
    assert published_versions(repo)[2] == rec["model_version"] and (svc.state.versions / rec["model_version"]).is_dir()
    # A corrupted candidate is refused at the next gate, never published; the candidate restarts from serving.
    import torch

    with torch.no_grad():
        next(t.learner.candidate.parameters()).fill_(float("nan"))
    t.process(events[end : end + 96])  # min_samples since the publish: the gate looks again
    svc.step()
    assert sorted(published_versions(repo)) == [1, 2]
    refused = svc.state.lineage()[-1]
    assert refused["event"] == "refused" and refused["reason"] == "non_finite_weights"
    assert t.counts["candidate_resets"] == 1 and t.serving_version == 2
    # A manual rollback (the CLI's function): the trainer serves version 1's weights again.
    served, hidden = rollback_to(repo)
    assert (served, hidden) == (1, [2]) and sorted(published_versions(repo)) == [1]
    t.process(events[end + 96 : end + 128])
    svc.step()
    assert t.serving_version == 1 and published_version_gauge() == 1  # the gauge follows the rollback
    assert any(r["event"] == "rollback" and r["to"] == 1 for r in svc.state.lineage())
    svc._snapshot()
    st = status(svc.cfg.state_dir, repo)  # what `hisam trainer status` prints
    assert st["serving_version"] == 1 and st["repository_versions"] == {"1": published_versions(repo)[1]}
    assert (
        st["trained"] == end + 128
        and st["window_rows"] == min(end + 128, 400)
        and st["lineage"][-1]["event"] == "rollback"
    )


def _learned_checkpoint(tmp_path, events) -> Path:
    """A warm start that has learned the synthetic stream (the version a bad publish is judged against)."""
    t = tiny_trainer()
    for i in range(0, len(events), 32):
        t.process(events[i : i + 32])
    return save_checkpoint(
        tmp_path / "learned", t.learner.candidate, tokenizer_version=TOKENIZER, meta={"variant": "hmat"}
    )


def test_published_version_gauge_follows_every_rollback_and_restart(tmp_path, template_dir) -> None:
    events = synthetic_examples(480, seed=4)
    learned = _learned_checkpoint(tmp_path, events[:256])
    # A gate that passes any finite candidate, and a probation shorter than the next gate.
    lax = {"margin": 1.0, "min_improvement": -1.0, "min_samples": 96, "gate_window": 96, "probation": 64}
    svc = make_service(tmp_path, learned, template_dir, trainer=lax)
    svc.restore_or_bootstrap()
    repo, t = svc.cfg.repo, svc.trainer
    assert t.serving_version == 1 and published_version_gauge() == 1
    for i in range(256, 352, 32):
        t.process(events[i : i + 32])
    corrupt(t.learner.candidate, "scramble")  # finite but wrong: published, then judged on probation
    svc.step()
    assert sorted(published_versions(repo)) == [1, 2] and t.serving_version == 2 and published_version_gauge() == 2
    svc._snapshot()
    down = tmp_path / "down"  # the trainer as it is now, for a restart after a rollback from outside (below)
    shutil.copytree(tmp_path / "state", down / "state")
    shutil.copytree(repo, down / "repo")
    # Version 2 fails its probation against version 1 and is withdrawn.
    for i in range(352, 416, 32):
        t.process(events[i : i + 32])
        svc.step()
    rollback = svc.state.lineage()[-1]
    assert rollback["event"] == "rollback" and rollback["auto"] and (rollback["version"], rollback["to"]) == (2, 1)
    assert sorted(published_versions(repo)) == [1] and t.serving_version == 1 and published_version_gauge() == 1
    # A restart after it.
    svc._snapshot()
    obs.TRAINER_PUBLISHED_VERSION.set(0)
    again = make_service(tmp_path, learned, template_dir, trainer=lax)
    again.restore_or_bootstrap()
    assert again.trainer.serving_version == 1 and published_version_gauge() == 1
    # A rollback from outside while the trainer was down: it serves version 1 again from its start.
    assert rollback_to(down / "repo") == (1, [2])
    obs.TRAINER_PUBLISHED_VERSION.set(0)
    restarted = make_service(down, learned, template_dir, trainer=lax)
    restarted.restore_or_bootstrap()
    assert restarted.trainer.serving_version == 1 and published_version_gauge() == 1
    followed = restarted.state.lineage()[-1]
    assert (followed["event"], followed["auto"], followed["version"], followed["to"]) == ("rollback", False, 2, 1)


def _metrics(topic: str) -> dict[str, float]:
    from prometheus_client import REGISTRY

    def get(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    lags = [
        REGISTRY.get_sample_value("hisam_trainer_consumer_lag_records", {"topic": topic, "partition": str(p)})
        for p in range(2)
    ]
    return {
        "trained": get("hisam_trainer_samples_trained_total"),
        "duplicates": get("hisam_trainer_sample_duplicates_total"),
        "rejected": get("hisam_trainer_samples_rejected_total", reason=sm.TOKENIZER_MISMATCH),
        "batches": get("hisam_trainer_batch_latency_seconds_count"),
        "steps": get("hisam_trainer_step_latency_seconds_count"),
        "auc_serving": get("hisam_trainer_prequential_auc_ratio", model="serving"),
        "auc_candidate": get("hisam_trainer_prequential_auc_ratio", model="candidate"),
        "auc_frozen": get("hisam_trainer_prequential_auc_ratio", model="frozen"),
        "lag": sum(x or 0.0 for x in lags),
        "lag_partitions": sum(x is not None for x in lags),  # partitions whose gauge was set
    }


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from infra.kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in records:
        p.send(topic, key=key, value=value)
    p.flush()
    p.close()


def _rewind_group(bootstrap: str, group: str, topic: str, partitions: int) -> None:
    """Commit offset 0 for the group: the state's offsets must win over the group's."""
    from infra.kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    c.assign(tps)
    c.commit({tp_: OffsetAndMetadata(0, "", -1) for tp_ in tps})
    c.close()


@pytest.mark.kafka
def test_service_consumes_resumes_exactly_and_dead_letters_on_the_real_broker(
    tmp_path, warm_checkpoint, template_dir, kafka_bootstrap
) -> None:
    run = uuid.uuid4().hex[:8]
    topic, dead, group = f"ts-{run}", f"dl-{run}", f"trainer-{run}"
    tp.ensure_topics(kafka_bootstrap, [tp.TopicSpec(topic, 2), tp.TopicSpec(dead, 1)])
    events = synthetic_examples(160, seed=6)
    records = [(str(e.user_id).encode(), sm.sample_bytes(e, TOKENIZER, CODEBOOK)) for e in events]
    foreign = pb.TrainingSample.FromString(records[3][1])
    foreign.tokenizer_version, foreign.event_id = "tok-test-v2", "foreign-1"
    records.insert(50, (b"3", foreign.SerializeToString()))
    records.insert(90, records[10])  # an upstream redelivery
    _produce(kafka_bootstrap, topic, records)
    common = {"bootstrap": kafka_bootstrap, "topic": topic, "dead_letter_topic": dead, "group_id": group}
    common |= {"max_records": 32, "max_wait_s": 0.3}
    trainer_cfg = {"min_samples": 10_000, "window": 10_000}  # no publish here: consumption only
    before = _metrics(topic)
    first = make_service(
        tmp_path, warm_checkpoint, template_dir, max_samples=64, idle_exit_s=5, trainer=trainer_cfg, **common
    )
    first.run(threading.Event())
    assert 64 <= first.trainer.trained < 160
    _rewind_group(kafka_bootstrap, group, topic, 2)
    second = make_service(tmp_path, warm_checkpoint, template_dir, idle_exit_s=3, trainer=trainer_cfg, **common)
    second.run(threading.Event())
    t = second.trainer
    assert t.trained == 160 and t.counts["duplicates"] == 1 and t.counts["rejected_tokenizer_mismatch"] == 1
    assert sum(t.offsets.values()) == len(records) and len(t.learner.window) == 160
    seen = sorted(r[0] for r in t.learner.window.rows)
    assert seen == sorted(e.user_id for e in events)  # every event scored exactly once across the restart
    # The Prometheus metrics (infra/observability.py) moved by exactly what the two runs did.
    after = _metrics(topic)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["trained"] == 160 and delta["duplicates"] == 1 and delta["rejected"] == 1
    assert delta["batches"] == len(first.reports) + len(second.reports)
    assert delta["steps"] == t.learner.steps  # the second run resumed the first's step count
    assert all(0.0 < after[m] <= 1.0 for m in ("auc_serving", "auc_candidate", "auc_frozen"))
    assert after["lag_partitions"] == 2 and after["lag"] == 0  # set for both partitions, and caught up
    letters = consume_all(kafka_bootstrap, dead, lambda out: len(out) >= 1, timeout_s=20)
    dl = pb.DeadLetter.FromString(letters[0].value)
    assert dl.reason == sm.TOKENIZER_MISMATCH and dl.topic == topic
    # The group's committed offsets caught up with the state after the restart.
    from infra.kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    committed = {p: c.committed(TopicPartition(topic, p)) for p in range(2)}
    c.close()
    assert sum(committed.values()) == len(records)
