"""The ranker's data side: a Dataset and item codes in, HMAT training and evaluation streams out.

``sequences`` builds the training windows and
the evaluation streams (docs/method.md §3, §5), ``inputs`` gathers what a job needs before it
builds a model, ``report`` writes the Table 2 style report. The training loop is
``train``, the metrics and scoring ``evaluate``; the modules (HMAT, baselines) live in
``models.hmat``, and the profile tokens in ``features.profiles``.
"""

from recipes.ranker.inputs import (
    ITEM_ID_VERSION,
    PRESETS,
    RankerInputs,
    load_inputs,
    model_config,
    run_dir,
    select_users,
    semantic_codes,
)
from recipes.ranker.report import metrics_table, write_report
from recipes.ranker.sequences import PROTOCOLS, EvalSet, eval_set, training_sequences

__all__ = [
    "ITEM_ID_VERSION",
    "PRESETS",
    "PROTOCOLS",
    "EvalSet",
    "RankerInputs",
    "eval_set",
    "load_inputs",
    "metrics_table",
    "model_config",
    "run_dir",
    "select_users",
    "semantic_codes",
    "training_sequences",
    "write_report",
]
