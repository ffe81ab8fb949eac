"""Item-side cold start: the item-cold split, its metrics, and a paired bootstrap over users.

``split``: a seeded share of items loses every training interaction (behaviour rebuilt
without them, cold sets recomputed); ``tokenizer``: a tokenizer fitted on the split's warm
items only, and the guard that keeps models of different splits apart; ``metrics``:
cold-item GAUC and recall/NDCG@k of cold items within each user's ranking; ``bootstrap``:
the paired user bootstrap of a metric difference. docs/method.md §5, "Item cold start".
"""

from recipes.coldstart.bootstrap import PairedDiff, paired_bootstrap
from recipes.coldstart.metrics import (
    PerUser,
    cold_item_gauc,
    cold_item_metrics,
    cold_item_recall_ndcg,
    per_user_cold_item_gauc,
    per_user_cold_item_recall_ndcg,
)
from recipes.coldstart.split import SplitRecord, fit_items, item_cold_split, split_for, split_record
from recipes.coldstart.tokenizer import SPLIT_KEY, SplitMismatch, check_split, tokenizer_split, train_split_tokenizer

__all__ = [
    "SPLIT_KEY",
    "PairedDiff",
    "PerUser",
    "SplitMismatch",
    "SplitRecord",
    "check_split",
    "cold_item_gauc",
    "cold_item_metrics",
    "cold_item_recall_ndcg",
    "fit_items",
    "item_cold_split",
    "paired_bootstrap",
    "per_user_cold_item_gauc",
    "per_user_cold_item_recall_ndcg",
    "split_for",
    "split_record",
    "tokenizer_split",
    "train_split_tokenizer",
]
