"""Paired differences between evaluated models, each with its user-bootstrap interval.

For the Table 2 report: every row label against a reference label (by default the ID-only
baseline), seed by seed (seed k of a variant against seed k of the reference), on the same
scored rows. The metrics are per-user (recipes/coldstart/metrics.py), so the bootstrap
(recipes/coldstart/bootstrap.py) resamples users: GAUC (cold-item GAUC with every item
counted as cold, which is GAUC), cold-item GAUC, cold-item recall@k and NDCG@k.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from recipes.coldstart.bootstrap import Metric, paired_bootstrap
from recipes.coldstart.metrics import per_user_cold_item_gauc, per_user_cold_item_recall_ndcg

PAIRED_METRICS: tuple[str, ...] = ("gauc", "cold_item_gauc", "cold_item_recall", "cold_item_ndcg")


@dataclass(frozen=True)
class ScoredRows:
    """The rows a model scored (shared by the models compared) and its scores on them."""

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    def same_rows(self, other: ScoredRows) -> bool:
        return all(
            np.array_equal(a, b)
            for a, b in ((self.users, other.users), (self.items, other.items), (self.labels, other.labels))
        )


def metric_functions(items: np.ndarray, cold: np.ndarray, k: int) -> dict[str, Metric]:
    """Per-user metric functions over the rows of ``items`` (bound here, the rows are the same for both models)."""
    every = np.unique(items)
    return {
        "gauc": lambda u, y, s: per_user_cold_item_gauc(u, items, y, s, every),
        "cold_item_gauc": lambda u, y, s: per_user_cold_item_gauc(u, items, y, s, cold),
        "cold_item_recall": lambda u, y, s: per_user_cold_item_recall_ndcg(u, items, y, s, cold, k)[0],
        "cold_item_ndcg": lambda u, y, s: per_user_cold_item_recall_ndcg(u, items, y, s, cold, k)[1],
    }


def paired_differences(
    scored: Mapping[tuple[str, int], ScoredRows],
    reference: str,
    cold: np.ndarray,
    k: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """One dict per (label, seed) with a reference run of the same seed: ``{metric: [diff, lo, hi]}``.

    Label order is the order of ``scored``; ``ValueError`` if two paired runs scored different rows.
    """
    out = []
    for (label, run_seed), rows in scored.items():
        ref = scored.get((reference, run_seed))
        if label == reference or ref is None:
            continue
        if not rows.same_rows(ref):
            raise ValueError(f"{label} seed {run_seed} and {reference} scored different rows: no paired comparison")
        functions = metric_functions(rows.items, cold, k)
        entry: dict = {"label": label, "reference": reference, "seed": run_seed, "users": len(np.unique(rows.users))}
        for name in PAIRED_METRICS:
            entry[name] = list(paired_bootstrap(rows.users, rows.labels, rows.scores, ref.scores, functions[name],
                                                n_boot=n_boot, seed=seed))  # fmt: skip
        out.append(entry)
    return out
