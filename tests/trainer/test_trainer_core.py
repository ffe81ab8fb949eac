"""The trainer core without Kafka: test-then-train order, dedup, exact resume, gate, tokenizer versions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hisam_pb.v1 import events_pb2 as pb
from models.hmat.inference import rank_candidates
from models.hmat.sequence import build_stream
from stream import records as rec
from trainer import samples as sm
from trainer.core import NearlineTrainer, TrainerConfig
from trainer.state import StateDir
from trainer.testing import CODEBOOK, TOKENIZER, profile_of, synthetic_examples, tiny_config, warm_model


def make_trainer(**kw) -> NearlineTrainer:
    cfg = TrainerConfig(
        **{"lr": 3e-3, "ema": 0.0, "batch_size": 32, "window": 400, "min_samples": 64, "gate_window": 64, **kw}
    )
    return NearlineTrainer(warm_model(), profile_of, cfg, tokenizer_version=TOKENIZER)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scores_are_computed_before_training_on_the_batch() -> None:
    t = make_trainer()
    batch = synthetic_examples(48)
    before = copy.deepcopy(t.candidate)
    report = t.process(batch)
    stream = build_stream(t.sequences(batch), t.layout)
    with torch.no_grad():
        want = rank_candidates(before, stream)[:, 0].double().numpy()  # serving's one-pass scorer, pre-training
    np.testing.assert_allclose(report.scores["candidate"], want, atol=1e-6)
    np.testing.assert_allclose(report.scores["frozen"], want, atol=1e-6)  # warm start = candidate at first
    assert not same(weights(before), weights(t.candidate))  # and then it trained
    assert report.trained == 48 and len(t.window) == 48 and t.steps == 2
    assert len(report.step_seconds) == 2 and all(s > 0 for s in report.step_seconds)  # one time per step


def test_ema_candidate_is_the_moving_average_of_the_trained_weights() -> None:
    t = make_trainer(ema=0.9)
    warm = weights(t.candidate)
    t.process(synthetic_examples(32))  # one optimiser step
    assert t.steps == 1
    learned, cand = weights(t.learner), weights(t.candidate)
    names = dict(t.candidate.named_parameters())
    for k in names:
        torch.testing.assert_close(cand[k], 0.9 * warm[k] + 0.1 * learned[k], rtol=1e-5, atol=1e-7)
    assert not same(learned, warm)


def test_duplicate_events_are_not_trained_twice() -> None:
    t = make_trainer()
    batch = synthetic_examples(40)
    t.process(batch)
    w = weights(t.candidate)
    again = t.process(batch[:30] + batch[:5])  # a redelivered batch, with duplicates inside it too
    assert again.trained == 0 and again.duplicates == 35
    assert same(w, weights(t.candidate)) and t.trained == 40 and t.counts["duplicates"] == 35
    fresh = synthetic_examples(10, prefix="new")
    mixed = t.process(fresh + fresh[:3])
    assert mixed.trained == 10 and mixed.duplicates == 3


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_from_durable_state_continues_exactly(tmp_path, ema: float) -> None:
    events = synthetic_examples(160, seed=2)
    a = make_trainer(ema=ema)
    a.process(events[:64])
    a.offsets = {"training-samples:0": 64}
    sd = StateDir(tmp_path / "state")
    state, tensors = a.state_dict()
    sd.save(a.save_candidate, tensors, state)
    a.process(events[64:])
    b = make_trainer(ema=ema)  # a fresh process: warm start, then the snapshot
    snap, state, tensors = sd.load()
    b.load_state(snap, state, tensors, version_model=lambda n: pytest.fail("no published version yet"))
    assert b.offsets == {"training-samples:0": 64} and b.trained == 64
    b.process(events[64:])
    assert same(weights(a.candidate), weights(b.candidate)) and same(weights(a.learner), weights(b.learner))
    if ema:  # the candidate is the moving average of the trained weights, not the weights themselves
        assert not same(weights(a.candidate), weights(a.learner)) and a.learner is not a.candidate
    assert list(a.window.rows) == list(b.window.rows)
    assert b.process(events[:10]).trained == 0  # the seen ids survived the restart


def test_near_line_beats_frozen_the_gate_passes_it_and_refuses_corrupted_candidates() -> None:
    t = make_trainer(gate_window=240)
    events = synthetic_examples(768, seed=1)
    for i in range(0, 576, 48):
        t.process(events[i : i + 48])
    m = t.metrics(last=240)
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
        for p in t.candidate.parameters():
            p.copy_(p[torch.randperm(p.shape[0])] if p.dim() else p)
            p.mul_(-3.0)
    for i in range(576, 672, 48):
        t.process(events[i : i + 48])
    bad = t.gate()
    assert not bad.passed and bad.reason == "below_serving", bad
    assert bad.metrics["paired"]["upper"] < 0  # worse beyond noise, not just below on the point estimate
    # NaN weights: refused outright, whatever the window says.
    with torch.no_grad():
        next(t.candidate.parameters()).fill_(float("nan"))
    t.process(events[672:768])
    nan = t.gate()
    assert not nan.passed and nan.reason == "non_finite_weights"
    assert t.counts["non_finite_scores_candidate"] > 0


def test_probation_rolls_back_a_version_worse_than_its_parent() -> None:
    t = make_trainer(probation=64)
    events = synthetic_examples(512, seed=4)
    for i in range(0, 256, 32):
        t.process(events[i : i + 32])
    good = copy.deepcopy(t.candidate)
    t.serving, t.serving_version = good, 1
    t.candidate.load_state_dict(warm_model(seed=1).state_dict())  # an untrained version gets published
    t.on_published(2)
    assert t.parent_version == 1 and t.probation_verdict() is None
    for i in range(256, 352, 32):
        t.process(events[i : i + 32])
    verdict = t.probation_verdict()
    assert verdict is not None and not verdict.passed and verdict.reason == "underperforms_parent", verdict
    assert verdict.metrics["paired"]["upper"] < 0 and verdict.metrics["paired"]["n"] == 64
    t.on_rolled_back()
    assert t.serving_version == 1 and same(weights(t.candidate), weights(good)) and t.parent is None


def test_samples_decode_as_serving_reads_the_stream() -> None:
    """A TrainingSample as stream/records.py writes it: global tokens, ActionType history -> local codes, labels."""
    layout = tiny_config().layout
    offsets = np.arange(6) * CODEBOOK
    hist = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]) + offsets
    ev = rec.action_event("e1", 3, 42, pb.ACTION_TYPE_CLICK, 1_700_000_000_000)
    raw = rec.training_sample(
        ev, hist, np.array([pb.ACTION_TYPE_LIKE, pb.ACTION_TYPE_SKIP]), tuple(offsets + 5), TOKENIZER
    )
    ex = sm.decode_sample(raw.SerializeToString(), layout, TOKENIZER)
    np.testing.assert_array_equal(ex.history_codes, hist - offsets)
    np.testing.assert_array_equal(ex.history_actions, [1, 0])
    np.testing.assert_array_equal(ex.target_codes, [5] * 6)
    assert (ex.label, ex.user_id, ex.item_id, ex.event_id) == (1, 3, 42, "e1")
    assert (
        sm.decode_sample(sm.sample_bytes(ex, TOKENIZER, CODEBOOK), layout, TOKENIZER).history_codes.tolist()
        == ex.history_codes.tolist()
    )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: setattr(s, "tokenizer_version", "tok-test-v2"), sm.TOKENIZER_MISMATCH),
        (lambda s: s.target_tokens.append(1), sm.SHAPE_MISMATCH),
        (lambda s: s.history_tokens.__setitem__(0, 10_000), sm.TOKEN_RANGE),
        (lambda s: setattr(s, "event_id", ""), sm.INVALID_FIELD),
    ],
)
def test_bad_samples_are_rejected_with_a_reason(mutate, reason) -> None:
    ex = synthetic_examples(5)[-1]
    s = pb.TrainingSample.FromString(sm.sample_bytes(ex, TOKENIZER, CODEBOOK))
    mutate(s)
    with pytest.raises(sm.SampleRejected) as e:
        sm.decode_sample(s.SerializeToString(), tiny_config().layout, TOKENIZER)
    assert e.value.reason == reason
    with pytest.raises(sm.SampleRejected) as e:
        sm.decode_sample(b"\xff\xff", tiny_config().layout, TOKENIZER)
    assert e.value.reason == sm.DECODE_ERROR


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_path_on_cpu_autocast(tmp_path, precision, dtype) -> None:
    """The GPU path (``--target gpu``: CUDA autocast, a GradScaler for fp16) run by CPU autocast, the same code.

    The trunk must run in the reduced dtype, the action head and the prequential scores in
    fp32 (no bf16 probability grid), the weights stay fp32, and fp16's scaler state is
    part of the durable state.
    """
    events = synthetic_examples(64, seed=8)
    ref = make_trainer(precision="fp32", device="cpu")
    amp = make_trainer(precision=precision, device="cpu")
    assert ref.amp_dtype is None and amp.amp_dtype == dtype
    assert (amp.scaler is not None) == (precision == "fp16")
    trunk, head = [], []
    hooks = [
        amp.candidate.blocks[0].attn.q_proj.register_forward_hook(lambda m, i, o: trunk.append(o.dtype)),
        amp.candidate.action_head.register_forward_hook(lambda m, i, o: head.append(o.dtype)),
    ]
    want = ref.process(events)
    got = amp.process(events)
    for h in hooks:
        h.remove()
    assert set(trunk) == {dtype} and set(head) == {torch.float32}  # scoring and training both
    # Before training, both scored the same weights: reduced precision moves a probability by little.
    np.testing.assert_allclose(got.scores["candidate"], want.scores["candidate"], atol=0.03)
    assert len(np.unique(got.scores["candidate"])) == len(np.unique(want.scores["candidate"]))  # no bf16 grid ties
    assert np.isfinite(got.loss) and abs(got.loss - want.loss) < 0.05 and amp.steps == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in amp.candidate.parameters())
    assert not same(weights(amp.candidate), weights(amp.frozen))
    state, tensors = amp.state_dict()
    assert (tensors["scaler"] is not None) == (precision == "fp16")
    sd = StateDir(tmp_path / "state")
    sd.save(amp.save_candidate, tensors, state)
    again = make_trainer(precision=precision, device="cpu")
    again.load_state(*sd.load(), version_model=lambda n: pytest.fail("no published version"))
    if precision == "fp16":
        assert again.scaler.get_scale() == amp.scaler.get_scale()
    assert same(weights(again.candidate), weights(amp.candidate))
