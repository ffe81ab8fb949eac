"""Trainer fixtures: a tiny warm-start checkpoint and the traced ONNX template of its config.

Tracing the template takes 30-120 s on a busy 2-core machine (dynamo export), so it is kept
in pytest's cache directory keyed by ``export.template.template_key`` (config, model and
exporter sources, library versions): any change to those traces again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from export.template import Template
from features.store import ItemSids, StreamAction
from models.hmat.checkpoint import save_checkpoint
from trainer.samples import Example
from trainer.testing import CODEBOOK, N_CODES, TOKENIZER, tiny_config, warm_model


@pytest.fixture
def warm_checkpoint(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "warm", warm_model(), tokenizer_version=TOKENIZER, meta={"variant": "hmat"})


@pytest.fixture(scope="session")
def template_dir(build_cache) -> Path:
    """A directory holding the traced template of ``tiny_config`` (built once, cached across runs)."""
    root = build_cache("hisam-trainer-onnx")
    Template.load_or_build(tiny_config(), root)
    return root


def _seed_rank_store(store, events: list[Example], base: int, run: str) -> tuple[int, list[int]]:
    """What Rank needs to answer in the end-to-end tests: the SIDs of 12 of the events' items
    (ids offset by ``base``) and a 5-item history for user ``base + 1``.

    Returns (that user, the 12 candidate item ids as stored).
    """
    items = sorted({e.item_id for e in events})[:12]
    codes = {e.item_id: e.target_codes for e in events}
    offsets = [c * CODEBOOK for c in range(N_CODES)]
    sid = {i: tuple(int(x + o) for x, o in zip(codes[i], offsets, strict=True)) for i in items}
    store.put_item_sids([ItemSids(base + i, sid[i], TOKENIZER, 1) for i in items])
    user = base + 1
    for k, i in enumerate(items[:5]):
        store.append(StreamAction(user, f"{run}-h{k}", base + i, 3, 1 + k, sid[i]), want_history=False)
    return user, [base + i for i in items]


@pytest.fixture
def seed_rank_store():
    """``seed_rank_store(store, events, base, run)``: see ``_seed_rank_store`` (conftest modules are not importable)."""
    return _seed_rank_store
