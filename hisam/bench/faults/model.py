"""The bench's artifacts: a tiny trained tokenizer (the worker ingests item events with it) and a
tiny HMAT exported to ONNX (the Rank server scores with it in ONNX Runtime), both cached under
``--work-dir``, keyed by what makes them.

Both reuse the project's own helpers (``recipes.tokenizer.testing``, ``trainer.testing``,
``models.hmat.testing``, ``export.graphs``): the tokenizer gives 6 codes of 16 per item, the
model takes exactly that vocabulary, so every item the worker ingests is rankable.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

TOKENIZER_ITEMS = 256  # synthetic items the tiny tokenizer trains on
TOKENIZER_EPOCHS = 3
MODEL_SEED = 20260522


def tokenizer_dir(work_dir: Path) -> Path:
    """A tiny DST tokenizer (recipes.tokenizer.testing), trained once per work dir and key."""
    import recipes.tokenizer.testing as tt

    h = hashlib.sha256(Path(tt.__file__).read_bytes() + f"{TOKENIZER_ITEMS}-{TOKENIZER_EPOCHS}".encode())
    out = work_dir / f"tokenizer-{h.hexdigest()[:12]}"
    if not (out / "config.json").is_file():
        from models.device import torch_threads

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("training a tiny tokenizer into %s", out)
        with torch_threads(1):
            tt.tiny_tokenizer(tmp, n_items=TOKENIZER_ITEMS, epochs=TOKENIZER_EPOCHS)
        tmp.rename(out)
    return out


def exported_model(work_dir: Path) -> Path:
    """The tiny HMAT (trainer.testing.tiny_config, scrambled weights) as the three ONNX graphs."""
    import torch

    from export.graphs import GRAPHS, export_all, graph_key
    from models.hmat.model import HMAT
    from models.hmat.testing import scrambled
    from trainer.testing import tiny_config

    config = tiny_config()
    out = work_dir / f"hmat-{graph_key(config, str(MODEL_SEED))}"
    if not all((out / f"{g}.onnx").is_file() for g in GRAPHS):
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("exporting the tiny HMAT to %s (30-100 s on a busy CPU, once)", out)
        torch.manual_seed(MODEL_SEED)
        export_all(scrambled(HMAT(config)), tmp, tokenizer_version=None)
        tmp.rename(out)
    return out


def model_repo(work_dir: Path, dest: Path) -> Path:
    """A fresh model repository at ``dest`` serving the tiny model as version 1."""
    from serving.repository import publish_version

    publish_version(dest, exported_model(work_dir))
    return dest
