"""Semantic-ID tokenizers: DST (Hi-SAM), MACRec-style cross-modal RQ, plain RQ-VAE."""

from models.tokenizer.artifact import (
    FrozenTokenizer,
    TokenizerInputError,
    build_model,
    load_tokenizer,
    save_tokenizer,
)
from models.tokenizer.baselines import MACRec, MACRecConfig, RQVAE, RQVAEConfig
from models.tokenizer.collisions import CollisionError, collision_rate, resolve_collisions
from models.tokenizer.dst import DST, DSTConfig
from models.tokenizer.train import TrainConfig, encode_all, train_tokenizer

__all__ = [
    "DST", "DSTConfig", "MACRec", "MACRecConfig", "RQVAE", "RQVAEConfig",
    "FrozenTokenizer", "TokenizerInputError", "CollisionError",
    "TrainConfig", "train_tokenizer", "encode_all", "build_model", "save_tokenizer", "load_tokenizer",
    "collision_rate", "resolve_collisions",
]
