"""The trainer without Kafka (trainer/nearline.py): exact resume, the gate on a learning stream, probation."""

from __future__ import annotations

import copy

import pytest
import torch

from trainer.lineage import StateDir
from trainer.testing import same, synthetic_examples, tiny_trainer, warm_model, weights


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_from_durable_state_continues_exactly(tmp_path, ema: float) -> None:
    events = synthetic_examples(160, seed=2)
    a = tiny_trainer(ema=ema)
    a.process(events[:64])
    a.offsets = {"training-samples:0": 64}
    sd = StateDir(tmp_path / "state")
    state, tensors = a.state_dict()
    sd.save(a.save_candidate, tensors, state)
    a.process(events[64:])
    b = tiny_trainer(ema=ema)  # a fresh process: warm start, then the snapshot
    snap, state, tensors = sd.load()
    b.load_state(snap, state, tensors, version_model=lambda n: pytest.fail("no published version yet"))
    assert b.offsets == {"training-samples:0": 64} and b.trained == 64
    b.process(events[64:])
    la, lb = a.learner, b.learner
    assert same(weights(la.candidate), weights(lb.candidate)) and same(weights(la.stepped), weights(lb.stepped))
    if ema:  # the candidate is the moving average of the trained weights, not the weights themselves
        assert not same(weights(la.candidate), weights(la.stepped)) and la.stepped is not la.candidate
    assert list(la.window.rows) == list(lb.window.rows)
    assert b.process(events[:10]).trained == 0  # the seen ids survived the restart


def test_near_line_beats_frozen_the_gate_passes_it_and_refuses_corrupted_candidates() -> None:
    t = tiny_trainer(gate_window=240)
    events = synthetic_examples(768, seed=1)
    for i in range(0, 576, 48):
        t.process(events[i : i + 48])
    m = t.learner.window.metrics(last=240)
    assert m["candidate"]["auc"] > m["frozen"]["auc"] + 0.1, m
    ok = t.gate()
    assert ok.passed, ok
    stats = ok.metrics["paired"]  # the decision's statistics, on the same 240 events
    assert (
        stats["n"] == 240
        and stats["lower"] >= 0
        and stats["diff"] == pytest.approx(m["candidate"]["auc"] - m["serving"]["auc"])
    )
    t.on_published(2)
    assert t.gate().reason == "not_enough_samples"
    # Scrambled weights (finite): the next min_samples events show it and the gate refuses.
    with torch.no_grad():
        for p in t.learner.candidate.parameters():
            p.copy_(p[torch.randperm(p.shape[0])] if p.dim() else p)
            p.mul_(-3.0)
    for i in range(576, 672, 48):
        t.process(events[i : i + 48])
    bad = t.gate()
    assert not bad.passed and bad.reason == "below_serving", bad
    assert bad.metrics["paired"]["upper"] < 0  # worse beyond noise, not just below on the point estimate
    # NaN weights: refused outright, whatever the window says.
    with torch.no_grad():
        next(t.learner.candidate.parameters()).fill_(float("nan"))
    t.process(events[672:768])
    nan = t.gate()
    assert not nan.passed and nan.reason == "non_finite_weights"
    assert t.counts["non_finite_scores_candidate"] > 0


def test_probation_rolls_back_a_version_worse_than_its_parent() -> None:
    t = tiny_trainer(probation=64)
    events = synthetic_examples(512, seed=4)
    for i in range(0, 256, 32):
        t.process(events[i : i + 32])
    good = copy.deepcopy(t.learner.candidate)
    t.learner.serving, t.serving_version = good, 1
    t.learner.candidate.load_state_dict(warm_model(seed=1).state_dict())  # an untrained version gets published
    t.on_published(2)
    assert t.parent_version == 1 and t.probation_verdict() is None
    for i in range(256, 352, 32):
        t.process(events[i : i + 32])
    verdict = t.probation_verdict()
    assert verdict is not None and not verdict.passed and verdict.reason == "underperforms_parent", verdict
    assert verdict.metrics["paired"]["upper"] < 0 and verdict.metrics["paired"]["n"] == 64
    t.on_rolled_back()
    assert t.serving_version == 1 and same(weights(t.learner.candidate), weights(good)) and t.learner.parent is None
