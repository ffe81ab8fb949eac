"""The faults a trainer can be told to commit (trainer/faults.py); the end-to-end tests arm them in a child."""

from __future__ import annotations

import pytest
import torch

from trainer.faults import Faults, corrupt
from trainer.testing import same, warm_model, weights


def test_faults_are_none_by_default_and_only_known_ones_are_armed() -> None:
    none = Faults()
    assert none.corrupt_after_publishes is None and none.exit_in_publish is None
    assert Faults(corrupt_after_publishes=1, corrupt="nan", exit_in_publish="first_moved").corrupt == "nan"
    with pytest.raises(ValueError, match="corrupt"):
        Faults(corrupt="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exit_in_publish"):
        Faults(exit_in_publish="renamed")  # type: ignore[arg-type]


def test_scramble_is_finite_but_wrong_and_nan_is_not_finite() -> None:
    model = warm_model()
    before = weights(model)
    corrupt(model, "scramble")
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not same(before, weights(model))
    again = warm_model()
    corrupt(again, "scramble")
    assert same(weights(again), weights(model))  # deterministic
    corrupt(model, "nan")
    assert all(torch.isnan(p).all() for p in model.parameters())
