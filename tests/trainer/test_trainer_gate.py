"""The gate's statistics (trainer/paired.py) and its rule (trainer/gate.py) on constructed score sets with known answers.

Constructed windows: labels with a positive rate near ML-100K's, and scores that share a
noise term between the two models (as two versions of one model do), so the paired test
has something to cancel. "Equal" pairs have the same distribution (true D = 0); the
calibration tests count how often a gate at confidence c would pass them over many
seeded windows: about 1 - c when the test's assumptions hold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recipes.ranker.evaluate import auc
from trainer.config import TrainerConfig
from trainer.nearline import NearlineTrainer
from trainer.paired import delong, paired_bootstrap, paired_test, weighted_auc
from trainer.testing import TOKENIZER, profile_of, warm_model


def window(seed: int, n: int = 2000, users: int = 60, signal_a: float = 0.8, signal_b: float = 0.8):
    """(users, labels, a, b): two scorers of the same events, sharing most of their noise."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    y = (rng.random(n) < 0.55).astype(np.int64)
    shared = rng.normal(size=n)
    a = signal_a * y + shared + 0.5 * rng.normal(size=n)
    b = signal_b * y + shared + 0.5 * rng.normal(size=n)
    return u, y, a, b


def clustered_window(seed: int, users: int = 30, per_user: int = 60):
    """Equal scorers (true D = 0) whose advantage varies by user: events of a user are not independent."""
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(users), per_user)
    y = (rng.random(len(u)) < 0.55).astype(np.int64)
    shared = rng.normal(size=len(u))
    gain_a, gain_b = rng.normal(0.8, 0.6, users), rng.normal(0.8, 0.6, users)  # per-user signal strength
    a = gain_a[u] * y + shared + 0.5 * rng.normal(size=len(u))
    b = gain_b[u] * y + shared + 0.5 * rng.normal(size=len(u))
    return u, y, a, b


def test_weighted_auc_is_the_auc_of_the_resample_written_out() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # many ties
    w = rng.integers(0, 4, size=(6, 500))
    got = weighted_auc(y, s, w)
    want = [auc(np.repeat(y, row), np.repeat(s, row)) for row in w]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert weighted_auc(y, s, np.ones((1, 500)))[0] == pytest.approx(auc(y, s), abs=1e-12)
    assert math.isnan(weighted_auc(y, s, (1 - y)[None].astype(float))[0])  # no positive weight: undefined


def test_event_bootstrap_and_delong_agree_on_independent_events() -> None:
    """Two independent estimates of D's spread: the resampling one and DeLong's closed form."""
    u, y, a, b = window(1, signal_a=0.9)
    boot = paired_bootstrap(y, a, b, u, unit="event", resamples=2000, seed=0)
    dl = delong(y, a, b, u)
    assert boot.diff == pytest.approx(dl.diff, abs=1e-12) == pytest.approx(auc(y, a) - auc(y, b), abs=1e-12)
    assert dl.se == pytest.approx(boot.se, rel=0.1)
    assert dl.lower == pytest.approx(boot.lower, abs=0.5 * dl.se)


@pytest.mark.parametrize(("method", "unit"), [("bootstrap", "user"), ("bootstrap", "event"), ("delong", "event")])
def test_clearly_better_passes_and_clearly_worse_fails(method: str, unit: str) -> None:
    u, y, a, b = window(2, signal_a=1.0, signal_b=0.6)  # D ~ +0.05 with se ~ 0.007
    better = paired_test(y, a, b, u, method=method, unit=unit, confidence=0.95, resamples=500)
    assert better.lower > 0.02 and better.diff > 0.03
    worse = paired_test(y, b, a, u, method=method, unit=unit, confidence=0.95, resamples=500)
    assert worse.upper < -0.02 and worse.diff == pytest.approx(-better.diff)


@pytest.mark.parametrize("confidence", [0.8, 0.95])
def test_equal_with_noise_is_refused_at_the_stated_rate(confidence: float) -> None:
    """True D = 0: a margin-0 gate passes (lower >= 0) in about 1 - confidence of the windows."""
    seeds = range(100)
    passed = [delong(*window(s, n=1000)[1:], confidence=confidence).lower >= 0 for s in seeds]
    rate = float(np.mean(passed))
    assert abs(rate - (1 - confidence)) <= 0.08, rate
    boot = [
        paired_bootstrap(y, a, b, u, confidence=confidence, resamples=300, seed=s).lower >= 0
        for s in seeds[:40]
        for u, y, a, b in [window(s, n=1000)]
    ]
    assert float(np.mean(boot)) <= (1 - confidence) + 0.12, boot


def test_user_bootstrap_stays_calibrated_where_events_are_clustered() -> None:
    """Why the gate resamples users: with per-user effects, event-level intervals are too narrow."""
    seeds = range(40)
    by_user, by_event = [], []
    for s in seeds:
        u, y, a, b = clustered_window(s)
        by_user.append(paired_bootstrap(y, a, b, u, unit="user", confidence=0.9, resamples=300, seed=s).lower >= 0)
        by_event.append(delong(y, a, b, u, confidence=0.9).lower >= 0)
    assert np.mean(by_user) <= 0.2, np.mean(by_user)
    assert np.mean(by_event) >= np.mean(by_user) + 0.1, (np.mean(by_event), np.mean(by_user))


def test_bootstrap_is_deterministic_and_undefined_without_both_classes() -> None:
    u, y, a, b = window(3, n=400)
    assert paired_bootstrap(y, a, b, u, seed=7) == paired_bootstrap(y, a, b, u, seed=7)
    one_class = paired_test(np.ones(50, np.int64), a[:50], b[:50], u[:50])
    assert math.isnan(one_class.diff) and math.isnan(one_class.lower)
    one_user = paired_test(y, a, b, np.zeros_like(u))  # nothing to resample: no bounds, not a zero-width interval
    assert math.isnan(one_user.lower) and one_user.users == 1
    with pytest.raises(ValueError, match="confidence"):
        paired_test(y, a, b, u, confidence=1.0)


# --- the gate rule on a real trainer's window --------------------------------------------


def trainer_with_window(u, y, candidate, serving, since_publish: int | None = None, **kw) -> NearlineTrainer:
    cfg = TrainerConfig(**{"window": 4000, "min_samples": 500, "gate_window": 2000, "resamples": 400, **kw})
    t = NearlineTrainer(warm_model(), profile_of, cfg, tokenizer_version=TOKENIZER)
    t.learner.window.add(u, y, {"serving": serving, "candidate": candidate, "frozen": serving})
    t.learner.since_publish = len(y) if since_publish is None else since_publish
    return t


def test_gate_rule_margin_min_improvement_and_min_samples() -> None:
    u, y, a, b = window(4, signal_a=1.0, signal_b=0.6)
    ok = trainer_with_window(u, y, a, b).gate()
    assert ok.passed and ok.reason == "passed"
    stats = ok.metrics["paired"]
    assert stats["lower"] > 0 and stats["n"] == 2000 and stats["users"] == 60 and stats["method"] == "bootstrap"
    assert ok.metrics["vs_frozen"]["diff"] == pytest.approx(stats["diff"])  # frozen = serving here
    assert ok.metrics["candidate"]["auc"] == pytest.approx(stats["auc_a"])
    # Equal scorers with the same noise draw (identical but for a sliver): refused at margin 0, ...
    rng = np.random.default_rng(5)
    near = b + 1e-3 * rng.normal(size=len(b))
    refused = trainer_with_window(u, y, near, b).gate()
    assert refused.reason == "below_serving" and refused.metrics["paired"]["lower"] < 0
    # ... passed as non-inferior with a margin wider than their difference's noise.
    assert trainer_with_window(u, y, near, b, margin=0.01).gate().passed
    # A real but small gain is not enough when the rule asks for more.
    small = trainer_with_window(u, y, a, b, min_improvement=0.2).gate()
    assert small.reason == "insufficient_improvement" and 0 < small.metrics["paired"]["diff"] < 0.2
    # The gate compares only rows since the last publish, and opens after min_samples of them.
    assert trainer_with_window(u, y, a, b, since_publish=499).gate().reason == "not_enough_samples"
    last = trainer_with_window(u, y, a, b, since_publish=800).gate()
    assert last.metrics["rows"] == 800 and last.metrics["paired"]["n"] == 800
