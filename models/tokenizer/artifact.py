"""Tokenizer artifacts and the frozen tokenizer used on ingestion (the cold-start path).

An artifact is a directory: ``model.safetensors`` (weights and buffers), ``config.json``
(kind, model config, training config and summary, tokenizer version). The version is
``<kind>-<12 hex>`` of a SHA-256 over the config and the weights, so the same weights always
carry the same version and any change in either gives a new one (docs/design.md contracts).

Global token ids: code c of layer l becomes ``l * K + c``, so the vocabularies of different
codebooks never overlap (docs/design.md contracts); ``FrozenTokenizer.vocab_size == L * K``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.tokenizer.baselines import RQVAE, MACRec, MACRecConfig, RQVAEConfig
from models.tokenizer.collisions import resolve_collisions
from models.tokenizer.dst import DST, DSTConfig

KINDS: dict[str, tuple[type, type]] = {
    "dst": (DST, DSTConfig),
    "macrec": (MACRec, MACRecConfig),
    "rqvae": (RQVAE, RQVAEConfig),
}


class TokenizerInputError(ValueError):
    """Bad input to a frozen tokenizer; ``field`` names the offending modality (or '*')."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def build_model(kind: str, config: Mapping | object) -> nn.Module:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(KINDS)}")
    model_cls, config_cls = KINDS[kind]
    if not isinstance(config, config_cls):
        config = config_cls(**dict(config))
    return model_cls(config)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def compute_version(kind: str, config: dict, state: dict[str, torch.Tensor]) -> str:
    # No key sorting: the order of the modalities is the order of the codes, so it is content.
    h = hashlib.sha256(json.dumps({"kind": kind, "config": config}).encode())
    for name in sorted(state):
        t = state[name]
        h.update(name.encode())
        h.update(t.float().numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:12]}"


def save_tokenizer(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> str:
    """Write the artifact; returns its tokenizer version."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(model.config)
    state = _state(model)
    version = compute_version(model.kind, config, state)
    save_file(state, str(out / "model.safetensors"), metadata={"tokenizer_version": version})
    meta = {
        "kind": model.kind,
        "version": version,
        "config": config,
        "code_length": model.config.code_length,
        **(extra or {}),
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    return version


def load_tokenizer(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, config.json contents). Refuses an artifact whose weights changed."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"tokenizer artifact {path} is missing {f.name}")
    meta = json.loads(cfg_file.read_text())
    model = build_model(meta["kind"], meta["config"])
    state = load_file(str(weights))
    model.load_state_dict(state)
    version = compute_version(meta["kind"], dataclasses.asdict(model.config), _state(model))
    if version != meta["version"]:
        raise ValueError(
            f"tokenizer artifact {path}: weights/config give version {version}, config.json says {meta['version']}"
        )
    model.eval()
    return model, meta


class FrozenTokenizer:
    """A trained tokenizer, frozen: raw modality embeddings in, L integer tokens out.

    Deterministic (eval mode, no sampling), thread-safe for concurrent reads, one item or a
    batch. Inputs are validated before any arithmetic, so bad input is never turned into a
    code silently: wrong width, NaN/inf, unknown modality and, unless the model imputes it,
    a missing modality all raise ``TokenizerInputError`` naming the field.
    """

    def __init__(self, model: nn.Module, version: str):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if hasattr(self.model, "freeze"):
            self.model.freeze()
        self.version = version
        self.kind: str = model.kind
        self.modalities: dict[str, int] = dict(model.config.modalities)
        self.n_codes: int = model.config.code_length
        self.codebook_size: int = model.config.codebook_size
        self.token_offsets = np.arange(self.n_codes, dtype=np.int64) * self.codebook_size
        self.vocab_size = self.n_codes * self.codebook_size
        self.imputes_missing = getattr(model.config, "missing", "impute") == "impute"

    @classmethod
    def load(cls, path: str | Path) -> FrozenTokenizer:
        model, meta = load_tokenizer(path)
        return cls(model, meta["version"])

    # ------------------------------------------------------------------ validation
    def _validate(self, features: Mapping[str, object], present: Mapping[str, object] | None, batched: bool):
        unknown = sorted(set(features) - set(self.modalities))
        if unknown:
            raise TokenizerInputError(unknown[0], f"unknown modality; this tokenizer takes {list(self.modalities)}")
        size = None
        arrays: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for name, width in self.modalities.items():
            value = features.get(name)
            if value is None:
                arrays[name] = None
                continue
            arr = np.asarray(value, dtype=np.float32)
            if not batched:
                if arr.ndim != 1:
                    raise TokenizerInputError(name, f"expected a vector of width {width}, got shape {arr.shape}")
                arr = arr[None, :]
            elif arr.ndim != 2:
                raise TokenizerInputError(name, f"expected a (batch, {width}) array, got shape {arr.shape}")
            if arr.shape[1] != width:
                raise TokenizerInputError(name, f"expected width {width}, got {arr.shape[1]}")
            if size is None:
                size = arr.shape[0]
            elif arr.shape[0] != size:
                raise TokenizerInputError(name, f"batch of {arr.shape[0]} rows, other modalities have {size}")
            arrays[name] = arr
        if size is None:
            raise TokenizerInputError("*", f"no modality given; expected some of {list(self.modalities)}")
        for name in self.modalities:
            if arrays[name] is None:
                masks[name] = np.zeros(size, dtype=bool)
                arrays[name] = np.zeros((size, self.modalities[name]), dtype=np.float32)
            else:
                given = present.get(name) if present is not None else None
                masks[name] = (
                    np.ones(size, dtype=bool) if given is None else np.asarray(given, dtype=bool).reshape(size)
                )
            bad = ~np.isfinite(arrays[name]) & masks[name][:, None]
            if bad.any():
                row, col = map(int, np.argwhere(bad)[0])
                where = f"row {row}, " if batched else ""
                raise TokenizerInputError(name, f"non-finite value ({arrays[name][row, col]}) at {where}index {col}")
        stacked = np.stack([masks[m] for m in self.modalities], 1)
        if not stacked.any(1).all():
            row = int(np.argwhere(~stacked.any(1))[0][0])
            raise TokenizerInputError("*", f"row {row} has no modality present")
        if not self.imputes_missing:
            for name in self.modalities:
                if not masks[name].all():
                    raise TokenizerInputError(
                        name, "modality missing and this tokenizer is configured with missing='error'"
                    )
        return arrays, masks

    # ---------------------------------------------------------------------- encode
    @torch.inference_mode()
    def encode_codes(
        self, features: Mapping[str, object], present: Mapping[str, object] | None = None, batched: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Local codes (B, L) in [0, K) and last-layer distances (B, K)."""
        arrays, masks = self._validate(features, present, batched)
        x = {m: torch.from_numpy(a) for m, a in arrays.items()}
        p = {m: torch.from_numpy(a) for m, a in masks.items()}
        codes, dist = self.model.encode(x, p)
        return codes.numpy(), dist.numpy()

    def to_tokens(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(codes, dtype=np.int64) + self.token_offsets

    def encode(self, features: Mapping[str, object]) -> np.ndarray:
        """One item: {modality: vector (D_m,) or None} -> (L,) int64 global token ids."""
        codes, _ = self.encode_codes(features, None, batched=False)
        return self.to_tokens(codes[0])

    def encode_batch(
        self,
        features: Mapping[str, np.ndarray],
        present: Mapping[str, np.ndarray] | None = None,
        taken: Iterable[tuple[int, ...]] | None = None,
    ) -> np.ndarray:
        """A batch: {modality: (B, D_m)} -> (B, L) int64 global token ids.

        With ``taken`` (full token-ID tuples already assigned, e.g. the catalogue in the
        online store), collisions within the batch and against ``taken`` are resolved by the
        rule of ``collisions.resolve_collisions``.
        """
        codes, dist = self.encode_codes(features, present, batched=True)
        if taken is not None:
            taken_codes = [tuple(int(t) - int(o) for t, o in zip(ids, self.token_offsets)) for ids in taken]
            codes, _ = resolve_collisions(codes, dist, taken_codes)
        return self.to_tokens(codes)
