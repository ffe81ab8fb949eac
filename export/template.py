"""Fast, checked ONNX export of trainer candidates: re-weight a traced template, then prove parity.

Tracing the three serving graphs with the dynamo exporter (export/graphs.py) takes
30-100 s on a busy 2-core machine, which would dominate the publish latency of every
near-line version. The graphs' structure depends only on the config, not on the weights,
so the trainer traces once per config (``Template.build``) and, for each candidate, swaps
the weight initializers of that template (``Template.render``): milliseconds.

Which initializer holds which weight is learnt, not assumed: the template is traced from
a model whose every parameter is distinct random values, and each float initializer is
matched by value to the parameter it equals, as is or transposed (the exporter folds
``Linear``'s transpose into a new initializer). Unmatched initializers (rotary tables,
constants) do not depend on weights. The exporter could fold a weight in another way
(scaled, fused); then the rendered graph would disagree with PyTorch, which ``check_parity``
catches: ``build`` renders a second random model and checks it before the template is
used, and the gate checks every candidate again on real probe streams (ONNX Runtime vs
PyTorch, all three graphs, the tolerance of tests/serving: 1e-4 absolute). A failed check
never publishes; the caller may fall back to a full export (``export_graphs``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export import graphs as ex
from models.hmat.inference import rank_candidates
from models.hmat.model import HMAT, HMATConfig
from models.hmat.sequence import UserSequence, build_stream

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4  # ONNX Runtime vs PyTorch fp32 (tests/export/test_hmat_export.py explains it)
MAPPING_FILE = "mapping.json"
ENCODE_OUTPUTS = ("keys", "values", "slot_token_type", "slot_item", "slot_block", "slot_order", "n_slots", "n_items", "next_order")  # fmt: skip


class ParityError(AssertionError):
    """An exported graph does not compute what the PyTorch model computes."""


def template_key(config: HMATConfig) -> str:
    """Changes whenever the traced graph could (``graphs.graph_key``)."""
    return ex.graph_key(config)


def distinct_model(config: HMATConfig, seed: int) -> HMAT:
    """A model whose parameters are all distinct values (norm weights included), for tracing and mapping."""
    g = torch.Generator().manual_seed(seed)
    model = HMAT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _weights(model: HMAT) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def _fingerprint(a: np.ndarray) -> tuple:
    return (a.shape, hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest())


def map_initializers(graphs: dict[str, onnx.ModelProto], model: HMAT) -> dict[str, dict[str, list]]:
    """graph -> initializer name -> [parameter name, transposed] for every weight-carrying initializer."""
    index: dict[tuple, tuple[str, bool]] = {}
    for name, w in _weights(model).items():
        index.setdefault(_fingerprint(w), (name, False))
        if w.ndim == 2:
            index.setdefault(_fingerprint(w.T), (name, True))
    out: dict[str, dict[str, list]] = {}
    for g, proto in graphs.items():
        out[g] = {}
        for init in proto.graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT:
                continue
            hit = index.get(_fingerprint(numpy_helper.to_array(init)))
            if hit is not None:
                out[g][init.name] = list(hit)
    return out


def export_graphs(model: HMAT, tokenizer_version: str | None, version: str | None = None) -> dict[str, onnx.ModelProto]:
    """The slow, always-right path: trace the three graphs of ``model`` (export/graphs.py)."""
    return {
        g: ex.export_graph(model.eval(), g, tokenizer_version=tokenizer_version, version=version) for g in ex.GRAPHS
    }


@dataclasses.dataclass
class Template:
    """Traced graphs of one config plus where each weight goes (module docstring)."""

    config: HMATConfig
    graphs: dict[str, onnx.ModelProto]
    mapping: dict[str, dict[str, list]]

    @classmethod
    def build(cls, config: HMATConfig, seed: int = 0) -> Template:
        model = distinct_model(config, seed)
        graphs = export_graphs(model, None, "template")
        template = cls(config, graphs, map_initializers(graphs, model))
        check = distinct_model(config, seed + 1)
        check_parity(template.render(check, None), check, probe_sequences(config))  # raises if unusable
        return template

    @classmethod
    def load_or_build(cls, config: HMATConfig, cache_dir: str | Path) -> Template:
        """The template for ``config`` kept under ``cache_dir/<key>`` (built and saved when missing)."""
        root = Path(cache_dir) / template_key(config)
        if (root / MAPPING_FILE).is_file():
            return cls.load(root, config)
        log.info("tracing the ONNX template for this config (once per config; takes a while on CPU)")
        template = cls.build(config)
        template.save(root)
        return template

    def save(self, directory: str | Path) -> None:
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".template-", dir=out.parent))
        for g, proto in self.graphs.items():
            onnx.save(proto, str(tmp / f"{g}.onnx"))
        (tmp / MAPPING_FILE).write_text(
            json.dumps({"config": dataclasses.asdict(self.config), "mapping": self.mapping})
        )
        if out.exists():
            shutil.rmtree(tmp)
            return
        tmp.rename(out)

    @classmethod
    def load(cls, directory: str | Path, config: HMATConfig) -> Template:
        d = Path(directory)
        saved = json.loads((d / MAPPING_FILE).read_text())
        if saved["config"] != dataclasses.asdict(config):
            raise ValueError(f"the template in {d} was traced for another config")
        return cls(config, {g: onnx.load(str(d / f"{g}.onnx")) for g in ex.GRAPHS}, saved["mapping"])

    def render(
        self, model: HMAT, tokenizer_version: str | None, version: str | None = None
    ) -> dict[str, onnx.ModelProto]:
        """The three graphs of ``model``: the template with ``model``'s weights and metadata."""
        if dataclasses.asdict(model.config) != dataclasses.asdict(self.config):
            raise ValueError("the model's config differs from the template's: trace a new template")
        weights = _weights(model)
        meta = {
            "model_version": version or ex.model_version(model),
            "tokenizer_version": tokenizer_version or "",
            "config": json.dumps(dataclasses.asdict(model.config), sort_keys=True),
        }
        out = {}
        for g, proto in self.graphs.items():
            p = onnx.ModelProto()
            p.CopyFrom(proto)
            where = self.mapping[g]
            for init in p.graph.initializer:
                if init.name in where:
                    param, transposed = where[init.name]
                    w = weights[param].T if transposed else weights[param]
                    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w, dtype=np.float32), init.name))
            onnx.helper.set_model_props(p, {m.key: m.value for m in p.metadata_props} | meta)
            out[g] = p
        return out


def probe_sequences(config: HMATConfig, n_users: int = 3, n_candidates: int = 4, seed: int = 7) -> list[UserSequence]:
    """Synthetic valid streams (histories of different lengths, a cold user) when no real ones exist yet."""
    g = torch.Generator().manual_seed(seed)
    lengths = [0, *(min(config.max_items, 3 + 5 * u) for u in range(1, n_users))]
    return [
        UserSequence(
            profile=[min(u, config.profile_vocab_size - 1)] * min(2, config.max_profile_len),
            sids=torch.randint(config.codebook_size, (t, config.n_sid), generator=g),
            actions=torch.randint(config.n_actions, (t,), generator=g),
            candidates=torch.randint(config.codebook_size, (n_candidates, config.n_sid), generator=g),
        )
        for u, t in enumerate(lengths)
    ]


def ort_session(proto: onnx.ModelProto, provider: str = "CPUExecutionProvider"):
    """An ONNX Runtime session of ``proto`` on ``provider`` (the CPU provider behind it), one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)


def check_parity(
    graphs: dict[str, onnx.ModelProto],
    model: HMAT,
    probe: Sequence[UserSequence],
    atol: float = PARITY_ATOL,
    provider: str = "CPUExecutionProvider",
) -> float:
    """Max |ONNX Runtime - PyTorch| over the probe for the full and the cached path; raises ParityError.

    Every probe user must have the same number of candidates (the cached graph takes (B, N, k)).
    ``provider``: the ONNX Runtime execution provider to check (the trainer's publish uses the CPU).
    """
    model = model.eval()
    layout, rope = model.config.layout, model.config.rope
    stream = build_stream(list(probe), layout)
    with torch.no_grad():
        want = rank_candidates(model.cpu(), stream).numpy()  # (B, N)
    if not np.isfinite(want).all():
        raise ParityError("the PyTorch model itself gives non-finite scores on the probe")
    full = ort_session(graphs["ranking"], provider).run(["scores"], ex.ranking_feed(stream, rope))[0]
    history = build_stream([UserSequence(u.profile, u.sids, u.actions) for u in probe], layout)
    enc = ort_session(graphs["encode_history"], provider).run(list(ENCODE_OUTPUTS), ex.stream_feed(history, rope))
    cache = ex.cache_from_outputs(dict(zip(ENCODE_OUTPUTS, enc, strict=True)))
    candidates = torch.stack([torch.as_tensor(u.candidates) for u in probe])  # (B, N, k)
    cached = ort_session(graphs["score_with_cache"], provider).run(["scores"], ex.cache_feed(cache, candidates))[0]
    worst = 0.0
    for name, got in (("ranking", full), ("score_with_cache", cached)):
        if got.shape != want.shape or not np.isfinite(got).all():
            raise ParityError(f"{name}: ONNX gives shape {got.shape} / non-finite scores, PyTorch {want.shape}")
        diff = float(np.abs(got - want).max()) if want.size else 0.0
        if diff > atol:
            raise ParityError(f"{name}: ONNX Runtime and PyTorch differ by {diff:.2e} > {atol:.0e}")
        worst = max(worst, diff)
    return worst
