"""The gate and probation: when the candidate may replace the serving model, and when a new version goes.

Gate (``gate_decision``): with at least ``min_samples`` prequential rows since the last
publish, the candidate and the serving model are compared on the last of them (up to
``gate_window``), on the same events: a paired test of D = AUC(candidate) - AUC(serving)
(paired.py: a user-level bootstrap by default, or DeLong). It passes when D's lower bound
at ``confidence`` is at least ``-margin`` (not worse beyond noise by more than the margin)
and D itself is at least ``min_improvement``; the weights must be finite. With the defaults
(margin 0, confidence 0.9) a candidate is published only when it is better than the serving
model with 90% one-sided confidence. The decision records both AUCs, D, its standard error
and bounds, and the same test against the frozen warm start. The publisher adds the export
checks (ONNX parity on real probe streams, publisher.py).

Probation (``probation_verdict``): after a publish, the new version and its parent are both
scored for ``probation`` samples (learner.py); it is rolled back (and the candidate restarts
from the parent's weights) when it is worse beyond noise (the upper bound of
AUC(published) - AUC(parent) below 0) by more than ``rollback_margin`` (D < -rollback_margin).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.hmat.model import HMAT
from trainer.config import TrainerConfig
from trainer.paired import PairedTest, paired_test
from trainer.prequential import Window, metrics_of


@dataclass
class GateDecision:
    passed: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


def weights_finite(model: HMAT) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def paired(users: np.ndarray, labels: np.ndarray, a: np.ndarray, b: np.ndarray, cfg: TrainerConfig) -> PairedTest:
    """AUC(a) - AUC(b) on the same rows, by the configured test (paired.py); deterministic."""
    return paired_test(
        labels,
        a,
        b,
        users,
        method=cfg.gate_method,  # type: ignore[arg-type]
        unit=cfg.gate_unit,  # type: ignore[arg-type]
        confidence=cfg.confidence,
        resamples=cfg.resamples,
        seed=cfg.seed,
    )


def gate_decision(
    window: Window, since_publish: int, candidate: HMAT, serving_is_frozen: bool, cfg: TrainerConfig
) -> GateDecision:
    """Whether the candidate may be published now (module docstring); the export checks come after.

    ``window`` holds the prequential rows (``learner.MODELS``), the last ``since_publish``
    of them since the last publish; ``serving_is_frozen``: nothing was published yet.
    """
    if since_publish < cfg.min_samples:
        return GateDecision(False, "not_enough_samples", {"since_publish": since_publish})
    last = min(since_publish, cfg.gate_window, len(window))
    users, labels, scores = window.arrays(last)
    info: dict[str, Any] = {
        "rows": last,
        "since_publish": since_publish,
        **{m: metrics_of(users, labels, s) for m, s in scores.items()},
    }
    if not weights_finite(candidate):
        return GateDecision(False, "non_finite_weights", info)
    t0 = time.perf_counter()
    test = paired(users, labels, scores["candidate"], scores["serving"], cfg)
    info["paired"] = test.to_dict()
    info["vs_frozen"] = (
        info["paired"]  # the same test until the first publish
        if serving_is_frozen
        else paired(users, labels, scores["candidate"], scores["frozen"], cfg).to_dict()
    )
    info["stats_s"] = time.perf_counter() - t0  # both tests: the gate's cost per micro-batch
    info["rule"] = {"margin": cfg.margin, "min_improvement": cfg.min_improvement, "confidence": cfg.confidence}
    if math.isnan(test.diff) or math.isnan(test.lower):
        return GateDecision(False, "undefined_auc", info)
    if test.lower < -cfg.margin:
        return GateDecision(False, "below_serving", info)
    if test.diff < cfg.min_improvement:
        return GateDecision(False, "insufficient_improvement", info)
    return GateDecision(True, "passed", info)


def probation_verdict(window: Window | None, cfg: TrainerConfig) -> GateDecision | None:
    """None while on probation (or none running); else keep (passed) or roll back (not passed).

    ``window``: the probation rows (``learner.PROBATION_MODELS``), None when none is running.
    """
    if window is None or len(window) < cfg.probation:
        return None
    users, labels, scores = window.arrays()
    m: dict[str, Any] = {k: metrics_of(users, labels, s) for k, s in scores.items()}
    test = paired(users, labels, scores["published"], scores["parent"], cfg)
    m["paired"] = test.to_dict()
    if not math.isnan(test.diff) and test.upper < 0 and test.diff < -cfg.rollback_margin:
        return GateDecision(False, "underperforms_parent", m)
    return GateDecision(True, "kept", m)


def summary(metrics: dict[str, Any]) -> str:
    """The per-model AUC / GAUC entries of ``metrics`` in one line (other entries are skipped)."""
    return ", ".join(
        f"{m} AUC {v['auc']:.4f} GAUC {v['gauc']:.4f}"
        for m, v in metrics.items()
        if isinstance(v, dict) and "auc" in v and "gauc" in v
    )


def paired_summary(test: dict[str, Any]) -> str:
    """One line of a PairedTest dict: D, its standard error and bounds."""
    return (
        f"D={test['diff']:+.4f} (se {test['se']:.4f}, bounds [{test['lower']:+.4f}, {test['upper']:+.4f}] at "
        f"{test['confidence']:.2f}, {test['method']}/{test['unit']}, {test['n']} events, {test['users']} users)"
    )
