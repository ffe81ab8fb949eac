"""Hostile state files and lost dead letters: the trainer runs no code from its volume and commits no offset
past a dead letter the broker did not take.

A planted pickle (a file whose unpickling would create a marker file) in the snapshot's
``optimizer.pt``, in a warm start's ``trainer_state.pt`` and in an offline run's checkpoint is
refused with a clear error, and the marker never appears. Files of the format the project
writes (tensors and plain containers) load as before.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
import torch

from models.hmat.checkpoint import STATE_FILE, save_checkpoint
from recipes.ranker.train import TrainConfig, train
from stream import topics as tp
from trainer.config import ServiceConfig
from trainer.consumer import DeliveryError, SampleConsumer
from trainer.lineage import OPTIMIZER, StateDir, UnsafeStateError
from trainer.testing import TOKENIZER, tiny_trainer, warm_model


class _Planted:
    """Unpickling this runs ``open(marker, "w")``: what an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"optimizer": _Planted(marker), "stage": "sft"}, path)


def test_a_planted_pickle_in_the_snapshot_is_refused_and_runs_nothing(tmp_path) -> None:
    t = tiny_trainer()
    state, tensors = t.state_dict()
    sd = StateDir(tmp_path / "state")
    snap = sd.save(t.save_candidate, tensors, state)
    snap_dir, loaded_state, opt = sd.load()  # the format the trainer writes loads with weights_only
    assert snap_dir == snap and loaded_state["trained"] == 0 and set(opt) >= {"optimizer", "torch_rng"}
    marker = tmp_path / "pwned"
    _plant(snap / OPTIMIZER, marker)
    with pytest.raises(UnsafeStateError, match=r"refusing .*optimizer\.pt.*would run code"):
        sd.load()
    assert not marker.exists()


def test_a_planted_pickle_in_a_warm_start_is_refused_and_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "warm", warm_model(), tokenizer_version=TOKENIZER)
    _plant(ckpt / STATE_FILE, marker)
    with pytest.raises(UnsafeStateError, match="trainer_state.pt"):
        tiny_trainer().learner.warm_start_optimizer(ckpt / STATE_FILE)
    assert not marker.exists()


def test_offline_resume_refuses_a_planted_pickle_and_resumes_a_real_checkpoint(tmp_path) -> None:
    from trainer.testing import profile_of, synthetic_examples

    events = synthetic_examples(96, seed=3)
    seqs = [
        dataclasses.replace(e.sequence(profile_of(e.user_id), 20), candidates=())
        for e in events
        if len(e.history_actions)
    ]
    cfg = TrainConfig(stage="sft", epochs=1, batch_size=32)
    ckpt = tmp_path / "ckpt"
    train(warm_model(), seqs, cfg, checkpoint_dir=ckpt, tokenizer_version=TOKENIZER, stop_at_step=1)
    train(warm_model(), seqs, cfg, checkpoint_dir=ckpt, resume=True, tokenizer_version=TOKENIZER)  # loads as before
    marker = tmp_path / "pwned"
    _plant(ckpt / STATE_FILE, marker)
    with pytest.raises(ValueError, match="would run code"):
        train(warm_model(), seqs, cfg, checkpoint_dir=ckpt, resume=True, tokenizer_version=TOKENIZER)
    assert not marker.exists()


@pytest.mark.kafka
def test_dead_letters_the_broker_refused_fail_the_flush_before_any_commit(tmp_path, kafka_bootstrap) -> None:
    run = uuid.uuid4().hex[:8]
    topic, dead = f"ts-flush-{run}", f"dl-flush-{run}"
    # The broker refuses records over 1 KiB on the dead-letter topic: a send that fails after it left.
    specs = [tp.TopicSpec(topic, 1), tp.TopicSpec(dead, 1, configs={"max.message.bytes": "1024"})]
    tp.ensure_topics(kafka_bootstrap, specs)
    cfg = ServiceConfig(
        bootstrap=kafka_bootstrap, state_dir=tmp_path, repo=tmp_path, topic=topic, dead_letter_topic=dead
    )
    consumer = SampleConsumer(cfg)
    consumer.connect({})
    try:
        consumer.send_dead_letter(b"k", b"small")
        consumer.flush()  # acknowledged: nothing raised
        consumer.send_dead_letter(b"k", b"x" * 4096)
        with pytest.raises(DeliveryError, match=rf"1 dead letter\(s\) to {dead} not delivered after 2 attempts"):
            consumer.flush(attempts=2, timeout_s=10)
        consumer.flush()  # nothing pending any more: the batch is redelivered after the restart, not here
    finally:
        consumer.close()
