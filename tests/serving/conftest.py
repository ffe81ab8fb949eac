"""Serving fixtures: a tiny scrambled HMAT, its three ONNX graphs, a model repository.

Exporting the three graphs takes 30-100 s on a busy 2-core machine (dynamo tracing), so the
exported files are kept in pytest's cache directory (``.pytest_cache``), keyed by a hash of
the model's and the exporter's source files, the config, the seed and the torch version:
any change to them exports again. The weights are stored with the graphs, so the PyTorch
reference always runs the exact weights the graphs were exported from. The export itself
is tested in tests/models/test_hmat_export.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import onnx
import pytest
import torch

from models.hmat import export as ex
from models.hmat.model import HMAT, HMATConfig, hmat_cpu
from models.hmat.testing import scrambled

MODEL_SOURCES = ("export.py", "model.py", "onnx_ops.py", "sequence.py", "mask.py", "inference.py")
SEED = 20260522
N_CODES = 6  # the tiny tokenizer's codes per item (3 shared + 1 per modality)
CODEBOOK = 16  # the tiny tokenizer's codebook size


def tiny_config() -> HMATConfig:
    return dataclasses.replace(
        hmat_cpu(), n_sid=N_CODES, codebook_size=CODEBOOK, profile_vocab_size=8, max_items=20, max_profile_len=4
    )


def scrambled_model(config: HMATConfig, seed: int) -> HMAT:
    """Weights at a scale where attention patterns matter (the 0.02 init makes scores nearly flat)."""
    torch.manual_seed(seed)
    return scrambled(HMAT(config))


def _export_key(config: HMATConfig, seed: int) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    src = Path(ex.__file__).parent
    for name in MODEL_SOURCES:
        h.update((src / name).read_bytes())
    h.update(f"{seed}|{torch.__version__}|{onnx.__version__}".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class TinyExport:
    model: HMAT
    graphs: dict[str, onnx.ModelProto]


@pytest.fixture(scope="session")
def tiny_export(build_cache) -> TinyExport:
    config = tiny_config()
    cache = build_cache("hisam-serving-onnx") / _export_key(config, SEED)
    if not all((cache / f"{g}.onnx").is_file() for g in ex.GRAPHS) or not (cache / "weights.pt").is_file():
        model = scrambled_model(config, SEED)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), tmp / "weights.pt")
        ex.export_all(model, tmp, tokenizer_version=None)
        tmp.rename(cache)
    model = HMAT(config)
    model.load_state_dict(torch.load(cache / "weights.pt"))
    return TinyExport(model.eval(), {g: onnx.load(str(cache / f"{g}.onnx")) for g in ex.GRAPHS})


def restamped(graphs: dict[str, onnx.ModelProto], **props: str) -> dict[str, onnx.ModelProto]:
    """Copies of the graphs with metadata entries replaced (a new model_version / tokenizer_version)."""
    out = {}
    for g, proto in graphs.items():
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        meta = {m.key: m.value for m in p.metadata_props} | props
        onnx.helper.set_model_props(p, meta)
        out[g] = p
    return out


@pytest.fixture(scope="session")
def restamp():
    """``restamped`` for tests (conftest modules are not importable)."""
    return restamped
