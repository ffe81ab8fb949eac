"""Shared fixtures: determinism first (STYLE.md: a seed fixture makes tests deterministic)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed every RNG the project uses; returns the seed for tests that need it."""
    import torch

    s = 1234
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s
