"""``hisam bench data``: the bring-your-own data pipeline on a synthetic catalogue, stage by stage.

Draws a catalogue with realistic skew (hisam.bench.data_synth: Zipf item popularity,
long-tail users, titles, categories, prices), writes it as CSV files, then loads it the way
``hisam data prepare`` does (data.custom + data.prepare) with behaviour and metadata built
from scratch (fresh caches), embeds the titles of ``--text-items`` items with the packaged
sentence encoder (throughput), and trains the DST tokenizer for one epoch on the result.
Prints each stage's seconds and the process's peak resident memory so far, then, as the
last line, one JSON object (the form every ``hisam bench`` follows). ``peak_rss_gb`` is the
peak over the data stages (generation to text); the tokenizer stage, which holds the whole
catalogue in the model's own tensors, is reported apart (``peak_rss_with_tokenizer_gb``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=None, help="default: interactions / 20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text-items", type=int, default=2000, help="items whose text is embedded to time the encoder (0: all)"
    )
    parser.add_argument("--text-device", default="auto", help="sentence encoder device (auto: CUDA when present)")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the one-epoch tokenizer stage")
    parser.add_argument("--out", default=None, help="keep the CSV files and caches here (default: a temporary dir)")
    parser.add_argument("--no-progress", action="store_true")


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, GB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run(args: argparse.Namespace, work: Path) -> dict:
    from data.custom import load_custom
    from data.prepare import PrepareSpec
    from data.text import embed_texts_chunked, resolve_device
    from hisam.bench.data_synth import SynthConfig, synthetic_catalogue

    result: dict[str, object] = {}

    def stage(name: str, seconds: float) -> None:
        result[f"{name}_s"] = round(seconds, 3)
        print(f"{name:<16} {seconds:9.2f} s   peak RSS {peak_rss_gb():6.2f} GB", flush=True)

    cfg = SynthConfig(items=args.items, interactions=args.interactions, users=args.users, seed=args.seed)
    t = time.perf_counter()
    items, interactions = synthetic_catalogue(cfg)
    stage("generate", time.perf_counter() - t)
    root = work / "catalogue"
    root.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    items.to_csv(root / "items.csv", index=False)
    interactions.to_csv(root / "interactions.csv", index=False)
    stage("write_csv", time.perf_counter() - t)
    titles = items["title"].tolist()
    del items, interactions

    spec = PrepareSpec(build=("behaviour", "metadata"), categorical=("categories",), numeric=("price",))
    t = time.perf_counter()
    ds = load_custom(root, spec=spec, cache_dir=work / "cache", progress=not args.no_progress)
    total = time.perf_counter() - t
    stage("load_csv", total - sum(spec.timings.values()))
    stage("behaviour", spec.timings.get("behaviour", 0.0))
    stage("metadata", spec.timings.get("metadata", 0.0))

    k = len(titles) if args.text_items <= 0 else min(args.text_items, len(titles))
    chosen = np.random.default_rng(args.seed).choice(len(titles), size=k, replace=False)
    chosen.sort()
    texts = [titles[i] for i in chosen]
    device = resolve_device(args.text_device)
    embed_texts_chunked(texts[: min(64, k)], work / "warm-cache", device=device, progress=False)  # load the model
    t = time.perf_counter()
    text = embed_texts_chunked(texts, work / "cache", device=device, progress=not args.no_progress)
    text_s = time.perf_counter() - t
    stage("text", text_s)
    result.update(text_items=k, text_items_per_s=round(k / text_s, 1), text_device=device)
    result["peak_rss_gb"] = round(peak_rss_gb(), 3)  # the data pipeline's peak: every stage above

    if not args.no_tokenizer:
        from models.tokenizer import build_model
        from recipes.tokenizer.train import TrainConfig, train_tokenizer
        from recipes.tokenizer.variants import VARIANTS, modality_widths

        full = np.zeros((ds.n_items, text.shape[1]), dtype=np.float32)
        full[chosen] = text
        present = np.zeros(ds.n_items, dtype=bool)
        present[chosen] = True
        ds.items.features["text"] = full  # the items without embedded text are missing it (present False)
        ds.items.present["text"] = present
        kind, preset = VARIANTS["dst"]
        model = build_model(kind, {"modalities": modality_widths(ds), **preset, "anchor": "text"})
        train_cfg = TrainConfig(epochs=1, refit=False, progress=not args.no_progress, device=resolve_device("auto"))
        t = time.perf_counter()  # one epoch, including the k-means codebook initialisation before it
        train_tokenizer(model, ds.items.features, ds.items.present, train_cfg)
        stage("tokenizer_epoch", time.perf_counter() - t)
        result["peak_rss_with_tokenizer_gb"] = round(peak_rss_gb(), 3)
    result.update(
        items=ds.n_items,
        users=ds.n_users,
        interactions=len(ds.interactions),
        behaviour_coverage=round(float(ds.items.present["behaviour"].mean()), 4),
        metadata_dim=int(ds.items.features["metadata"].shape[1]),
        machine=f"{platform.machine()} {os.cpu_count()} cores",
    )
    return result


def main(args: argparse.Namespace) -> int:
    if args.items < 2 or args.interactions < 2:
        log.error("--items and --interactions must be at least 2")
        return 1
    if args.out:
        result = run(args, Path(args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="hisam-bench-data-") as tmp:
            result = run(args, Path(tmp))
    print(
        f"behaviour + metadata: {result['behaviour_s'] + result['metadata_s']:.1f} s; "
        f"text {result['text_items_per_s']:.0f} items/s on {result['text_device']}; peak RSS {result['peak_rss_gb']:.2f} GB"
    )
    print(json.dumps(result))
    return 0
