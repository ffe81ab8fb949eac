"""The evaluation report: a markdown table in the shape of Hi-SAM Table 2, and training curves.

One row per variant, one column per metric (AUC, GAUC, cold-user AUC / GAUC, cold-item
AUC, and the item-side cold-start measures of recipes/coldstart: cold-item GAUC, recall@k
and NDCG@k of cold items within each user's ranking), each cell the mean over seeds +- the sample standard deviation (ddof = 1; a single
seed has no spread, shown as "n/a" rather than a misleading 0). NaN metrics (e.g. no
cold items in a slice) are left out of the mean and the count of seeds behind a cell is
given when it is not all of them.

When a reference row (the ID-only baseline by default) is evaluated beside others, a
second table gives each other row's paired difference to it, seed by seed, with a 95%
user-bootstrap interval (recipes/coldstart/compare.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS: tuple[tuple[str, str], ...] = (
    ("auc", "AUC"),
    ("gauc", "GAUC"),
    ("cold_user_auc", "Cold-user AUC"),
    ("cold_user_gauc", "Cold-user GAUC"),
    ("cold_item_auc", "Cold-item AUC"),
    ("cold_item_gauc", "Cold-item GAUC"),
    ("cold_item_recall", "Cold-item Recall@{k}"),
    ("cold_item_ndcg", "Cold-item NDCG@{k}"),
)
PAIRED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("gauc", "Δ GAUC"),
    ("cold_item_gauc", "Δ Cold-item GAUC"),
    ("cold_item_recall", "Δ Cold-item Recall@{k}"),
    ("cold_item_ndcg", "Δ Cold-item NDCG@{k}"),
)
LABELS = {
    "hmat": "HMAT (H-RoPE + MA-Attn)",
    "hmat-no-ma": "HMAT w/o MA-Attn",
    "hmat-rope1d": "HMAT w/ 1-D RoPE",
    "flat": "Flat semantic-ID transformer",
    "id": "ID-based transformer (SASRec/HSTU-style)",
}


TOKENIZER_NAMES = {"dst": "DST", "rqvae": "RQ-VAE", "macrec": "MACRec"}


def row_label(variant: str) -> str:
    """Report label of a row: a variant, or ``variant@kind`` for one trained on another tokenizer's codes."""
    base, _, kind = variant.partition("@")
    name = LABELS.get(base, base)
    return f"{name} on {TOKENIZER_NAMES.get(kind, kind)} IDs" if kind else name


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std, count) over the finite values; NaNs where undefined."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def format_cell(values: Sequence[float]) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    cell = f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f} ± n/a"
    return cell if n == len(values) else f"{cell} ({n}/{len(values)} seeds)"


def metrics_table(results: Mapping[str, Sequence[Mapping[str, float]]], k: int = 10) -> str:
    """Markdown table: ``results`` maps variant -> one metrics dict per seed; ``k`` of the cold-item recall/NDCG."""
    head = "| Method | Seeds | " + " | ".join(title.format(k=k) for _, title in COLUMNS) + " |"
    rule = "|---|---:|" + "---:|" * len(COLUMNS)
    rows = [
        f"| {row_label(variant)} | {len(runs)} | "
        + " | ".join(format_cell([r.get(key, math.nan) for r in runs]) for key, _ in COLUMNS)
        + " |"
        for variant, runs in results.items()
    ]
    return "\n".join([head, rule, *rows])


def format_interval(diff_lo_hi: Sequence[float]) -> str:
    diff, lo, hi = diff_lo_hi
    if not math.isfinite(diff):
        return "n/a"
    return f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]" if math.isfinite(lo) else f"{diff:+.4f} [n/a]"


def paired_table(paired: Sequence[Mapping[str, Any]], k: int = 10) -> str:
    """Markdown table of paired differences (row minus reference) with 95% bootstrap intervals."""
    head = "| Method − reference | Seed | Users | " + " | ".join(t.format(k=k) for _, t in PAIRED_COLUMNS) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(PAIRED_COLUMNS)
    rows = [
        f"| {row_label(p['label'])} − {row_label(p['reference'])} | {p['seed']} | {p['users']} | "
        + " | ".join(format_interval(p[key]) for key, _ in PAIRED_COLUMNS)
        + " |"
        for p in paired
    ]
    return "\n".join([head, rule, *rows])


def smooth(y: Sequence[float], alpha: float = 0.1) -> np.ndarray:
    """Exponential moving average, bias-corrected (as TensorBoard), so early points are not pulled to 0."""
    out, acc = np.empty(len(y)), 0.0
    for t, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        out[t] = acc / (1 - (1 - alpha) ** (t + 1))
    return out


def plot_curves(histories: Mapping[tuple[str, int, str], Sequence[Mapping[str, Any]]], out_dir: Path) -> list[Path]:
    """One figure per stage (loss vs step, one line per variant and seed); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    written = []
    for stage in sorted({s for (_, _, s), h in histories.items() if h}):  # stages some run trained
        fig, ax = plt.subplots(figsize=(7, 4))
        runs = sorted((k, h) for k, h in histories.items() if k[2] == stage and h)
        variants = sorted({v for (v, _, _), _ in runs})
        colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
        seen = set()
        for (variant, seed, _), hist in runs:
            steps = [r["step"] for r in hist]
            ax.plot(
                steps,
                smooth([r["loss"] for r in hist]),
                color=colours[variant],
                alpha=0.8,
                lw=1.2,
                label=None if variant in seen else row_label(variant),
            )
            seen.add(variant)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("PT next-token loss" if stage == "pt" else "SFT action NLL")
        ax.set_title(f"{stage.upper()} training loss (EMA-smoothed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"curves_{stage}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Sequence[Mapping[str, float]]],
    histories: Mapping[tuple[str, int, str], Sequence[Mapping[str, Any]]],
    context: Mapping[str, Any],
    paired: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """report.md + metrics.json + curves_*.png in ``out_dir``; returns the markdown file.

    ``paired``: recipes.coldstart.compare.paired_differences, a table of its own when not empty.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_curves(histories, out)
    first = next((runs[0] for runs in results.values() if runs), {})
    cold_k = int(context.get("cold-item k", 10))
    lines = [
        f"# Ranking evaluation: {context.get('dataset', '')}",
        "",
        "Mean ± sample std over seeds (Hi-SAM Table 2 layout; docs/method.md §5).",
        "",
        metrics_table(results, cold_k),
        "",
        *(
            [
                "## Paired differences",
                "",
                (
                    "Row minus reference on the same scored rows, seed by seed; in brackets the 95% "
                    "percentile interval of a paired bootstrap over users (docs/method.md §5)."
                ),
                "",
                paired_table(paired, cold_k),
                "",
            ]
            if paired
            else []
        ),
        "## Setup",
        "",
        *(f"- {k}: {v}" for k, v in context.items()),
        (
            f"- scored rows: {first.get('rows', 0)}, of cold users: {first.get('cold_user_rows', 0)}, "
            f"of cold items: {first.get('cold_item_rows', 0)}; users behind cold-item GAUC: "
            f"{first.get('cold_item_gauc_users', 0)}, behind cold-item Recall/NDCG: {first.get('cold_item_rank_users', 0)}"
        ),
        "",
        "## Training curves",
        "",
        *(f"![{p.stem}]({p.name})" for p in figures),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "metrics.json").write_text(
        json.dumps({"context": dict(context), "results": results, "paired": list(paired)}, indent=2, default=str)
    )
    return path
