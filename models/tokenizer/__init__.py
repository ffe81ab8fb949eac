"""Semantic-ID tokenizers: DST (Hi-SAM), MACRec-style cross-modal RQ, plain RQ-VAE."""

from models.tokenizer.artifact import (
    FrozenTokenizer,
    TokenizerInputError,
    build_model,
    load_tokenizer,
    save_tokenizer,
)
from models.tokenizer.baselines import RQVAE, MACRec, MACRecConfig, RQVAEConfig
from models.tokenizer.collisions import CollisionError, collision_rate, resolve_collisions
from models.tokenizer.dst import DST, DSTConfig

__all__ = [
    "DST",
    "RQVAE",
    "CollisionError",
    "DSTConfig",
    "FrozenTokenizer",
    "MACRec",
    "MACRecConfig",
    "RQVAEConfig",
    "TokenizerInputError",
    "build_model",
    "collision_rate",
    "load_tokenizer",
    "resolve_collisions",
    "save_tokenizer",
]
