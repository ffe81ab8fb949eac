"""``hisam ranker eval``: score the test split with every fine-tuned run and write the report.

For each ``<out>/<variant>/seed<k>/finetune`` checkpoint: rebuild its inputs (item codes
from the same tokenizer version, profiles from the vocabulary saved with it), score every
test interaction with one-pass ranking under the chosen protocol (recipes/ranker/sequences.py),
compute AUC, GAUC, cold-user AUC / GAUC and cold-item AUC (recipes/ranker/evaluate.py), then
write ``report.md`` (mean ± std over seeds, Hi-SAM Table 2 layout), ``metrics.json`` and
training-curve plots to ``--report-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from models.device import pick_device
from models.hmat.baselines import VARIANTS, uses_item_ids
from models.hmat.checkpoint import load_checkpoint, load_history
from models.tokenizer import FrozenTokenizer
from recipes.ranker import PROTOCOLS, EvalSet, RankerInputs, eval_set, load_inputs, select_users, write_report
from recipes.ranker.evaluate import ranking_metrics, score_examples, score_timelines
from recipes.ranker.runs import add_data_arguments, apply_threads, dataset_or_none, saved_vocab

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, help="variants to evaluate (default: all found)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds to evaluate (default: all found)")
    parser.add_argument(
        "--protocol",
        default="stream",
        choices=PROTOCOLS,
        help="stream: history includes earlier test interactions; train: train history only",
    )
    parser.add_argument(
        "--scorer",
        default="one-pass",
        choices=("one-pass", "cached"),
        help="one-pass: one stream per scored row; cached: the stream protocol with the anchor KV cache "
        "(same scores, far fewer tokens at long histories)",
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="OUT=TOKENIZER",
        help="more fine-tuned runs for the same report, trained on another tokenizer's codes (e.g. HMAT on "
        "RQ-VAE IDs: runs/ranker-rqvae=artifacts/tokenizers/rqvae); their rows are labelled '<variant>@<kind>'; "
        "repeatable",
    )
    parser.add_argument("--report-dir", type=Path, help="where the report goes (default <out>/report)")
    parser.add_argument("--max-tokens", type=int, default=32768, help="padded tokens per scoring batch")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))


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


def main(args: argparse.Namespace) -> int:
    apply_threads(args)
    # Setup.
    ds = dataset_or_none(args)
    if ds is None:
        return 1
    try:
        sources = [(args.out, args.tokenizer, None), *((o, t, tokenizer_kind(t)) for o, t in parse_also(args.also))]
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    runs = []  # (row label, variant, seed, run directory, tokenizer directory)
    for out, tokenizer_dir, kind in sources:
        found = find_runs(out, args.variant, args.seeds)
        if not found:
            log.error("no fine-tuned runs under %s (expected <variant>/seed<k>/finetune)", out)
            return 1
        runs += [(v if kind is None else f"{v}@{kind}", v, seed, run, tokenizer_dir) for v, seed, run in found]
    device = pick_device(args.device)
    users = select_users(ds, args.max_users)
    results: dict[str, list[dict]] = {}
    histories: dict[tuple[str, int, str], list[dict]] = {}
    versions, presets, windows = set(), set(), set()
    inputs_cache: dict[tuple[bool, str, str], RankerInputs] = {}
    evals_cache: dict[tuple[tuple[bool, str, str], int], EvalSet] = {}
    for label, variant, seed, run, tokenizer_dir in runs:
        # Model.
        model, saved = load_checkpoint(run / "finetune", device)
        # Data: the codes and profiles this checkpoint was trained on (shared between runs that agree).
        tokenizer = None if uses_item_ids(variant) else tokenizer_dir
        key = (uses_item_ids(variant), str(tokenizer), json.dumps(saved["profile_vocab"], sort_keys=True))
        if key not in inputs_cache:
            try:
                inputs_cache[key] = load_inputs(ds, variant, tokenizer, saved_vocab(saved))
            except (FileNotFoundError, ValueError) as e:  # no or bad tokenizer for a semantic-ID variant
                log.error("%s: %s", variant, e)
                return 1
        inputs = inputs_cache[key]
        if saved["tokenizer_version"] != inputs.tokenizer_version:
            log.error(
                "%s was trained on codes of %s, but the tokenizer given is %s",
                run,
                saved["tokenizer_version"],
                inputs.tokenizer_version,
            )
            return 1
        if (key, model.config.max_items) not in evals_cache:
            evals_cache[(key, model.config.max_items)] = eval_set(
                ds, inputs.item_codes, inputs.profiles, model.config.max_items, args.protocol, users
            )
        evals = evals_cache[(key, model.config.max_items)]
        # Loop: score and measure.
        options = {"max_tokens": args.max_tokens, "precision": args.precision, "progress": not args.no_progress}
        if args.scorer == "cached" and args.protocol == "stream":
            scores = score_timelines(model, evals.timelines, **options)
        else:
            scores = score_examples(model, evals.examples, **options)
        metrics = ranking_metrics(evals.user_idx, evals.item_idx, evals.label, scores, ds.cold_users, ds.cold_items)
        log.info(
            "%s seed %d: %s", label, seed, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("auc"))
        )
        results.setdefault(label, []).append({**metrics, "seed": seed})
        for stage, sub in (("pt", "pretrain"), ("sft", "finetune")):
            histories[(label, seed, stage)] = load_history(run / sub)
        versions.add(saved["tokenizer_version"])
        presets.add(saved.get("preset"))
        windows.add(model.config.max_items)
    context = {
        "dataset": ds.name,
        "protocol": args.protocol,
        "scorer": args.scorer if args.protocol == "stream" else "one-pass",
        "users": "all" if users is None else f"first {len(users)}",
        "seeds": sorted({seed for _, _, seed, _, _ in runs}),
        "presets": sorted(str(p) for p in presets),
        "max history items": sorted(windows),
        "item codes": sorted(versions),
        "device": str(device),
    }
    path = write_report(args.report_dir or args.out / "report", results, histories, context)
    log.info("report written to %s", path)
    return 0
