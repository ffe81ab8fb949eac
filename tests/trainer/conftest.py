"""Trainer fixtures: a tiny warm-start checkpoint and the traced ONNX template of its config.

Tracing the template takes 30-120 s on a busy 2-core machine (dynamo export), so it is kept
in pytest's cache directory keyed by ``onnx_export.template_key`` (config, model and
exporter sources, library versions): any change to those traces again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hisam.trainer.onnx_export import Template
from hisam.trainer.testing import TOKENIZER, tiny_config, warm_model
from models.hmat.train import save_checkpoint


@pytest.fixture
def warm_checkpoint(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "warm", warm_model(), tokenizer_version=TOKENIZER, meta={"variant": "hmat"})


@pytest.fixture(scope="session")
def template_dir(build_cache) -> Path:
    """A directory holding the traced template of ``tiny_config`` (built once, cached across runs)."""
    root = build_cache("hisam-trainer-onnx")
    Template.load_or_build(tiny_config(), root)
    return root
