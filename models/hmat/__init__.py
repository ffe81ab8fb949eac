"""HMAT ranker: model (model.py), token stream (sequence.py), MA-Attn mask (mask.py),
objectives (losses.py) and cached / one-pass inference (inference.py). docs/method.md §3-§4."""

from models.hmat.inference import AnchorKVCache, append_history, encode_history, rank_candidates, score_with_cache
from models.hmat.losses import pt_loss, sft_loss
from models.hmat.mask import attention_mask
from models.hmat.model import HMAT, HMATConfig, hmat_cpu, hmat_large, hmat_small
from models.hmat.sequence import StreamLayout, TokenStream, TokenType, UserSequence, build_stream, continue_stream

__all__ = [
    "HMAT",
    "AnchorKVCache",
    "HMATConfig",
    "StreamLayout",
    "TokenStream",
    "TokenType",
    "UserSequence",
    "append_history",
    "attention_mask",
    "build_stream",
    "continue_stream",
    "encode_history",
    "hmat_cpu",
    "hmat_large",
    "hmat_small",
    "pt_loss",
    "rank_candidates",
    "score_with_cache",
    "sft_loss",
]
