"""The ranker's data side: a Dataset and item codes in, HMAT training and evaluation streams out.

``profiles`` maps users to profile tokens, ``sequences`` builds the training windows and
the evaluation streams (METHOD.md §3, §5), ``inputs`` gathers what a job needs before it
builds a model, ``report`` writes the Table 2 style report. The model side (training
loop, metrics, baselines) lives in ``models.hmat``.
"""

from hisam.ranker.inputs import (
    ITEM_ID_VERSION,
    PRESETS,
    RankerInputs,
    load_inputs,
    model_config,
    run_dir,
    select_users,
    semantic_codes,
)
from hisam.ranker.profiles import ProfileVocab
from hisam.ranker.report import metrics_table, write_report
from hisam.ranker.sequences import PROTOCOLS, EvalSet, eval_set, training_sequences

__all__ = [
    "ITEM_ID_VERSION",
    "PRESETS",
    "PROTOCOLS",
    "EvalSet",
    "ProfileVocab",
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
