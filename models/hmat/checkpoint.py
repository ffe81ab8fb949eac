"""The HMAT checkpoint format: weights, config and training state in one directory.

Checkpoint directory (``save_checkpoint``):
- ``model.safetensors``: weights via ``safetensors.torch.save_model`` (the LM head is tied
  to the token embedding; ``save_file`` refuses shared tensors);
- ``config.json``: ``HMATConfig`` fields, the tokenizer version the item codes came from,
  and caller metadata (variant, profile vocabulary, ...), with ``format`` = ``CHECKPOINT_FORMAT``;
- ``trainer_state.pt``: optimiser / scheduler / scaler state, step, RNG state (written by
  the training recipe, ``recipes/ranker/train.py``);
- ``history.json``: the per-step training curve.
Files are written to a temporary name and renamed, so an interrupted save never leaves
a half-written checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from models.hmat.model import HMAT, HMATConfig

CHECKPOINT_FORMAT = 1
MODEL_FILE, CONFIG_FILE, STATE_FILE, HISTORY_FILE = (
    "model.safetensors",
    "config.json",
    "trainer_state.pt",
    "history.json",
)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file, fsync it, rename it over ``path``, fsync the directory:
    a crash leaves the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | Path,
    model: HMAT,
    *,
    tokenizer_version: str | None,
    meta: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint (module docstring); returns its directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": CHECKPOINT_FORMAT,
        "model": dataclasses.asdict(model.config),
        "tokenizer_version": tokenizer_version,
        **(meta or {}),
    }
    metadata = {"tokenizer_version": str(tokenizer_version)}
    _atomic_write(out / MODEL_FILE, lambda p: save_model(model, str(p), metadata=metadata))
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    if trainer_state is not None:
        _atomic_write(out / STATE_FILE, lambda p: torch.save(trainer_state, p))
    if history is not None:
        _atomic_write(out / HISTORY_FILE, lambda p: p.write_text(json.dumps(history)))
    return out


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not an HMAT checkpoint: {CONFIG_FILE} is missing")
    config = json.loads(path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {config.get('format')} is not {CHECKPOINT_FORMAT}")
    return config


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[HMAT, dict[str, Any]]:
    """(model in eval mode on ``device``, config.json contents)."""
    config = read_checkpoint_config(directory)
    model = HMAT(HMATConfig(**config["model"]))
    load_weights(model, directory)
    return model.to(device).eval(), config


def load_weights(model: HMAT, directory: str | Path) -> None:
    """Load a checkpoint's weights into ``model`` (e.g. PT weights before SFT); shapes must match."""
    missing, unexpected = load_model(model, str(Path(directory) / MODEL_FILE), strict=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory}: missing {missing}, unexpected {unexpected}")


def load_history(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / HISTORY_FILE
    return json.loads(path.read_text()) if path.exists() else []
