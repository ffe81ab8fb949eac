"""Score the test split with every fine-tuned run of a run directory (``hisam ranker eval``).

For each ``<out>/<variant>/seed<k>/finetune`` checkpoint: rebuild its inputs (item codes
from the same tokenizer version, profiles from the vocabulary saved with it), score every
test interaction with one-pass ranking under the chosen protocol (recipes/ranker/sequences.py)
and compute AUC, GAUC, cold-user AUC / GAUC and cold-item AUC (recipes/ranker/evaluate.py), and
the within-user cold-item GAUC, recall@k and NDCG@k (recipes/coldstart/metrics.py); with a
reference row (the ID-only baseline by default), every other row's paired difference to it
with a user-bootstrap interval (recipes/coldstart/compare.py). On an item-cold split
(``--item-cold-share``) only checkpoints trained on that same split are accepted.
Runs that agree on their codes, profiles and history length share one evaluation set: on
ML-100K building it costs about as much as scoring one run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import Dataset
from models.device import pick_device
from models.hmat.baselines import VARIANTS, uses_item_ids
from models.hmat.checkpoint import load_checkpoint, load_history
from models.tokenizer import FrozenTokenizer
from recipes.coldstart import SplitMismatch, SplitRecord, check_split, cold_item_metrics
from recipes.coldstart.compare import ScoredRows, paired_differences
from recipes.coldstart.tokenizer import describe
from recipes.ranker import EvalSet, RankerInputs, eval_set, load_inputs, select_users
from recipes.ranker.evaluate import ranking_metrics, score_examples, score_timelines
from recipes.ranker.runs import saved_vocab

log = logging.getLogger(__name__)


class EvalRunsError(Exception):
    """A run, tokenizer or option the evaluation cannot use; the message says which (nothing is written)."""


@dataclass(frozen=True)
class EvalConfig:
    protocol: str = "stream"  # recipes.ranker.PROTOCOLS
    scorer: str = "grouped"  # or "one-pass": one stream per scored row (the definition; the same scores)
    max_tokens: int = 32768  # padded tokens per scoring batch
    precision: str = "auto"
    device: str = "auto"
    max_users: int | None = None
    progress: bool = True
    cold_k: int = 10  # k of the cold-item recall@k / NDCG@k
    reference: str | None = "id"  # row label the paired bootstrap compares every other row with (None: no table)
    bootstrap: int = 1000  # paired bootstrap resamples (users drawn with replacement)


@dataclass(frozen=True)
class EvalRun:
    label: str  # the report's row: the variant, or "<variant>@<tokenizer kind>" for --also runs
    variant: str
    seed: int
    directory: Path  # <out>/<variant>/seed<k>
    tokenizer: Path | None


@dataclass
class Evaluation:
    """What ``recipes.ranker.write_report`` takes: metrics per row label and seed, training curves, context."""

    results: dict[str, list[dict]] = field(default_factory=dict)
    histories: dict[tuple[str, int, str], list[dict]] = field(default_factory=dict)
    context: dict = field(default_factory=dict)
    paired: list[dict] = field(default_factory=list)  # recipes.coldstart.compare.paired_differences


def tokenizer_kind(path: Path) -> str:
    """'rqvae', 'dst', ... from the artifact's version (``KIND-<hash>``)."""
    return FrozenTokenizer.load(path).version.rsplit("-", 1)[0]


def parse_also(specs: list[str]) -> list[tuple[Path, Path]]:
    """``OUT=TOKENIZER`` pairs; ``ValueError`` naming the one that is not."""
    pairs = []
    for spec in specs:
        out, sep, tokenizer = spec.partition("=")
        if not sep or not out or not tokenizer:
            raise ValueError(f"--also {spec!r}: expected OUT=TOKENIZER (a run directory and a tokenizer directory)")
        pairs.append((Path(out), Path(tokenizer)))
    return pairs


def find_runs(out: Path, variants: list[str] | None, seeds: list[int] | None) -> list[tuple[str, int, Path]]:
    """(variant, seed, run directory) of every fine-tuned run, in VARIANTS then seed order."""
    runs = []
    for variant in variants or VARIANTS:
        for path in sorted((out / variant).glob("seed*/finetune/config.json")):
            seed = int(path.parent.parent.name.removeprefix("seed"))
            if seeds is None or seed in seeds:
                runs.append((variant, seed, path.parent.parent))
    return sorted(runs, key=lambda r: (VARIANTS.index(r[0]), r[1]))


def collect_runs(
    out: Path, tokenizer: Path | None, also: list[str], variants: list[str] | None, seeds: list[int] | None
) -> list[EvalRun]:
    """The runs under ``out`` (on ``tokenizer``'s codes) and under each ``--also OUT=TOKENIZER``."""
    try:
        sources = [(out, tokenizer, None), *((o, t, tokenizer_kind(t)) for o, t in parse_also(also))]
    except (ValueError, FileNotFoundError) as e:
        raise EvalRunsError(str(e)) from e
    runs = []
    for directory, tokenizer_dir, kind in sources:
        found = find_runs(directory, variants, seeds)
        if not found:
            raise EvalRunsError(f"no fine-tuned runs under {directory} (expected <variant>/seed<k>/finetune)")
        runs += [EvalRun(v if kind is None else f"{v}@{kind}", v, s, run, tokenizer_dir) for v, s, run in found]
    return runs


def evaluate_runs(ds: Dataset, runs: list[EvalRun], config: EvalConfig, split: SplitRecord | None = None) -> Evaluation:
    """Every run's metrics on the test split, its training curves, and what the report says about the setup.

    ``ds`` is the item-cold split ``split`` describes (recipes.coldstart), or the whole
    dataset when ``split`` is None; a checkpoint trained on another split is refused.
    """
    device = pick_device(config.device)
    users = select_users(ds, config.max_users)
    out = Evaluation()
    versions, presets, windows = set(), set(), set()
    inputs_cache: dict[tuple[bool, str, str], RankerInputs] = {}
    evals_cache: dict[tuple[tuple[bool, str, str], int], EvalSet] = {}
    scored: dict[tuple[str, int], ScoredRows] = {}
    for run in runs:
        model, saved = load_checkpoint(run.directory / "finetune", device)
        try:
            check_split(f"checkpoint {run.directory / 'finetune'}", saved.get("item_cold_split"), split)
        except SplitMismatch as e:
            raise EvalRunsError(str(e)) from e
        # The codes and profiles this checkpoint was trained on (shared between runs that agree).
        tokenizer = None if uses_item_ids(run.variant) else run.tokenizer
        key = (uses_item_ids(run.variant), str(tokenizer), json.dumps(saved["profile_vocab"], sort_keys=True))
        if key not in inputs_cache:
            try:
                inputs_cache[key] = load_inputs(ds, run.variant, tokenizer, saved_vocab(saved))
            except (FileNotFoundError, ValueError) as e:  # no or bad tokenizer for a semantic-ID variant
                raise EvalRunsError(f"{run.variant}: {e}") from e
        inputs = inputs_cache[key]
        if saved["tokenizer_version"] != inputs.tokenizer_version:
            raise EvalRunsError(
                f"{run.directory} was trained on codes of {saved['tokenizer_version']}, "
                f"but the tokenizer given is {inputs.tokenizer_version}"
            )
        window = (key, model.config.max_items)
        if window not in evals_cache:
            evals_cache[window] = eval_set(
                ds, inputs.item_codes, inputs.profiles, model.config.max_items, config.protocol, users
            )
        metrics, scores = _score(model, evals_cache[window], ds, config)
        ev = evals_cache[window]
        scored[(run.label, run.seed)] = ScoredRows(ev.user_idx, ev.item_idx, ev.label, scores)
        log.info(
            "%s seed %d: %s",
            run.label,
            run.seed,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("auc")),
        )
        out.results.setdefault(run.label, []).append({**metrics, "seed": run.seed})
        for stage, sub in (("pt", "pretrain"), ("sft", "finetune")):
            out.histories[(run.label, run.seed, stage)] = load_history(run.directory / sub)
        versions.add(saved["tokenizer_version"])
        presets.add(saved.get("preset"))
        windows.add(model.config.max_items)
    out.context = {
        "dataset": ds.name,
        "protocol": config.protocol,
        "scorer": config.scorer if config.protocol == "stream" else "one-pass",
        "users": "all" if users is None else f"first {len(users)}",
        "seeds": sorted({run.seed for run in runs}),
        "presets": sorted(str(p) for p in presets),
        "max history items": sorted(windows),
        "item codes": sorted(versions),
        "device": str(device),
        "item-cold split": describe(split),
        "cold-item k": config.cold_k,
    }
    if config.reference is not None and any(label == config.reference for label, _ in scored):
        try:
            out.paired = paired_differences(scored, config.reference, ds.cold_items, config.cold_k, config.bootstrap)
        except ValueError as e:
            raise EvalRunsError(str(e)) from e
        out.context["paired bootstrap"] = f"{config.bootstrap} resamples of users, 95% percentile intervals"
    return out


def _score(model, evals: EvalSet, ds: Dataset, config: EvalConfig) -> tuple[dict, np.ndarray]:
    """One run's ranking metrics on one evaluation set, and its scores (one per row of ``evals``)."""
    options = {"max_tokens": config.max_tokens, "precision": config.precision, "progress": config.progress}
    if config.scorer == "grouped" and config.protocol == "stream":
        scores = score_timelines(model, evals.timelines, **options)
    else:
        scores = score_examples(model, evals.examples, **options)
    metrics = ranking_metrics(evals.user_idx, evals.item_idx, evals.label, scores, ds.cold_users, ds.cold_items)
    cold = cold_item_metrics(evals.user_idx, evals.item_idx, evals.label, scores, ds.cold_items, config.cold_k)
    return {**metrics, **cold}, scores
