"""Collision rate and collision resolution of full semantic IDs (docs/method.md §1b, codebook hygiene).

Letters: N items, L code length, K codebook size.

Rule: an item keeps its natural ID unless an earlier item (in the given order) already has
it; a later duplicate has its *last* code reassigned to the nearest codebook entry, by the
last layer's distances, that makes the full ID unique. The last code is the finest one, so
the item moves as little as possible in the semantic space, and the rule is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class CollisionError(RuntimeError):
    """No free entry is left in the last codebook for an item's prefix."""


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose full ID at least one other item also has. ``codes``: (N, L)."""
    if len(codes) == 0:
        return 0.0
    _, inverse, counts = np.unique(np.asarray(codes), axis=0, return_inverse=True, return_counts=True)
    return float((counts[inverse.reshape(-1)] > 1).mean())


def resolve_collisions(
    codes: np.ndarray,
    last_distances: np.ndarray,
    taken: Iterable[tuple[int, ...]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Make every full ID unique, also against ``taken`` (IDs already assigned elsewhere).

    codes: (N, L) int; last_distances: (N, K) distances of each item to the last codebook.
    Returns (resolved codes (N, L), reassigned mask (N,) bool).
    """
    codes = np.asarray(codes).copy()
    claimed: set[tuple[int, ...]] = set(map(tuple, taken))
    reassigned = np.zeros(len(codes), dtype=bool)
    pending = []
    for i, row in enumerate(codes):  # pass 1: natural IDs, first come first served
        key = tuple(int(c) for c in row)
        if key in claimed:
            pending.append(i)
        else:
            claimed.add(key)
    for i in pending:  # pass 2: nearest free last code
        prefix = tuple(int(c) for c in codes[i, :-1])
        for k in np.argsort(last_distances[i], kind="stable"):
            key = prefix + (int(k),)
            if key not in claimed:
                codes[i, -1] = k
                claimed.add(key)
                reassigned[i] = True
                break
        else:
            raise CollisionError(f"item {i}: every last code under prefix {prefix} is taken")
    return codes, reassigned
