from __future__ import annotations

import numpy as np
import pytest

from models.tokenizer.collisions import CollisionError, collision_rate, resolve_collisions
from recipes.tokenizer.metrics import code_modality_association, perplexity, utilisation


def test_collision_rate_counts_items_sharing_a_full_id():
    codes = np.array([[0, 1], [0, 1], [0, 2], [1, 1]])
    assert collision_rate(codes) == pytest.approx(0.5)  # two of four items share [0, 1]
    assert collision_rate(np.empty((0, 2), dtype=int)) == 0.0


def test_resolution_reassigns_last_code_to_nearest_free_entry():
    codes = np.array([[0, 1], [0, 1], [0, 1], [1, 1]])
    dist = np.array([[5, 0, 1, 2], [5, 0, 1, 2], [5, 0, 1, 2], [0, 0, 0, 0]], dtype=float)
    out, moved = resolve_collisions(codes, dist)
    assert collision_rate(out) == 0.0
    assert out.tolist() == [[0, 1], [0, 2], [0, 3], [1, 1]]  # nearest free: 2, then 3
    assert moved.tolist() == [False, True, True, False]


def test_resolution_respects_taken_ids_and_keeps_natural_ids_first():
    codes = np.array([[0, 1], [0, 2]])
    dist = np.tile(np.array([0.0, 1.0, 2.0, 3.0]), (2, 1))
    out, moved = resolve_collisions(codes, dist, taken=[(0, 1)])
    assert out.tolist() == [[0, 0], [0, 2]]
    assert moved.tolist() == [True, False]


def test_resolution_fails_loudly_when_prefix_is_full():
    codes = np.array([[0, 0], [0, 0], [0, 0]])
    with pytest.raises(CollisionError, match="prefix"):
        resolve_collisions(codes, np.zeros((3, 2)))


def test_utilisation_and_perplexity_hand_case():
    codes = np.array([[0, 0], [1, 0], [2, 0], [3, 0]])
    assert utilisation(codes, 4) == [1.0, 0.25]
    assert perplexity(codes, 4) == pytest.approx([4.0, 1.0])


def test_association_is_high_for_informative_codes_and_near_zero_for_random():
    rng = np.random.default_rng(0)
    labels = rng.integers(8, size=2000)
    centres = rng.normal(size=(8, 5)) * 3
    feats = {"a": centres[labels] + rng.normal(size=(2000, 5)), "b": rng.normal(size=(2000, 5))}
    present = {k: np.ones(2000, bool) for k in feats}
    codes = np.stack([labels, rng.integers(8, size=2000)], 1)
    assoc = code_modality_association(codes, feats, present)
    assert assoc[0, 0] > 0.8  # the informative layer explains modality a
    assert abs(assoc[0, 1]) < 0.02 and abs(assoc[1, 0]) < 0.02 and abs(assoc[1, 1]) < 0.02
