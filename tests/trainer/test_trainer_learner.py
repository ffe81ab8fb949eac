"""Test-then-train without Kafka (trainer/learner.py): scores before training, the moving average, dedup, precision."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models.hmat.inference import rank_candidates
from models.hmat.sequence import build_stream
from trainer.lineage import StateDir
from trainer.testing import same, synthetic_examples, tiny_trainer, weights


def test_scores_are_computed_before_training_on_the_batch() -> None:
    t = tiny_trainer()
    lr = t.learner
    batch = synthetic_examples(48)
    before = copy.deepcopy(lr.candidate)
    report = t.process(batch)
    stream = build_stream(lr.sequences(batch), lr.layout)
    with torch.no_grad():
        want = rank_candidates(before, stream)[:, 0].double().numpy()  # serving's one-pass scorer, pre-training
    np.testing.assert_allclose(report.scores["candidate"], want, atol=1e-6)
    np.testing.assert_allclose(report.scores["frozen"], want, atol=1e-6)  # warm start = candidate at first
    assert not same(weights(before), weights(lr.candidate))  # and then it trained
    assert report.trained == 48 and len(lr.window) == 48 and lr.steps == 2
    assert len(report.step_seconds) == 2 and all(s > 0 for s in report.step_seconds)  # one time per step


def test_ema_candidate_is_the_moving_average_of_the_trained_weights() -> None:
    lr = tiny_trainer(ema=0.9).learner
    warm = weights(lr.candidate)
    lr.process(synthetic_examples(32))  # one optimiser step
    assert lr.steps == 1
    learned, cand = weights(lr.stepped), weights(lr.candidate)
    names = dict(lr.candidate.named_parameters())
    for k in names:
        torch.testing.assert_close(cand[k], 0.9 * warm[k] + 0.1 * learned[k], rtol=1e-5, atol=1e-7)
    assert not same(learned, warm)


def test_duplicate_events_are_not_trained_twice() -> None:
    t = tiny_trainer()
    batch = synthetic_examples(40)
    t.process(batch)
    w = weights(t.learner.candidate)
    again = t.process(batch[:30] + batch[:5])  # a redelivered batch, with duplicates inside it too
    assert again.trained == 0 and again.duplicates == 35
    assert same(w, weights(t.learner.candidate)) and t.trained == 40 and t.counts["duplicates"] == 35
    fresh = synthetic_examples(10, prefix="new")
    mixed = t.process(fresh + fresh[:3])
    assert mixed.trained == 10 and mixed.duplicates == 3


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_path_on_cpu_autocast(tmp_path, precision, dtype) -> None:
    """The GPU path (``--target gpu``: CUDA autocast, a GradScaler for fp16) run by CPU autocast, the same code.

    The trunk must run in the reduced dtype, the action head and the prequential scores in
    fp32 (no bf16 probability grid), the weights stay fp32, and fp16's scaler state is
    part of the durable state.
    """
    events = synthetic_examples(64, seed=8)
    ref = tiny_trainer(precision="fp32", device="cpu")
    amp = tiny_trainer(precision=precision, device="cpu")
    assert ref.amp_dtype is None and amp.amp_dtype == dtype
    assert (amp.learner.scaler is not None) == (precision == "fp16")
    trunk, head = [], []
    hooks = [
        amp.learner.candidate.blocks[0].attn.q_proj.register_forward_hook(lambda m, i, o: trunk.append(o.dtype)),
        amp.learner.candidate.action_head.register_forward_hook(lambda m, i, o: head.append(o.dtype)),
    ]
    want = ref.process(events)
    got = amp.process(events)
    for h in hooks:
        h.remove()
    assert set(trunk) == {dtype} and set(head) == {torch.float32}  # scoring and training both
    # Before training, both scored the same weights: reduced precision moves a probability by little.
    np.testing.assert_allclose(got.scores["candidate"], want.scores["candidate"], atol=0.03)
    assert len(np.unique(got.scores["candidate"])) == len(np.unique(want.scores["candidate"]))  # no bf16 grid ties
    assert np.isfinite(got.loss) and abs(got.loss - want.loss) < 0.05 and amp.learner.steps == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in amp.learner.candidate.parameters())
    assert not same(weights(amp.learner.candidate), weights(amp.learner.frozen))
    state, tensors = amp.state_dict()
    assert (tensors["scaler"] is not None) == (precision == "fp16")
    sd = StateDir(tmp_path / "state")
    sd.save(amp.save_candidate, tensors, state)
    again = tiny_trainer(precision=precision, device="cpu")
    again.load_state(*sd.load(), version_model=lambda n: pytest.fail("no published version"))
    if precision == "fp16":
        assert again.learner.scaler.get_scale() == amp.learner.scaler.get_scale()
    assert same(weights(again.learner.candidate), weights(amp.learner.candidate))
