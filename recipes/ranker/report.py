"""The evaluation report: a markdown table in the shape of Hi-SAM Table 2, and training curves.

One row per variant, one column per metric (AUC, GAUC, cold-user AUC / GAUC, cold-item
AUC), each cell the mean over seeds +- the sample standard deviation (ddof = 1; a single
seed has no spread, shown as "n/a" rather than a misleading 0). NaN metrics (e.g. no
cold items in a slice) are left out of the mean and the count of seeds behind a cell is
given when it is not all of them.
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


def metrics_table(results: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """Markdown table: ``results`` maps variant -> one metrics dict per seed."""
    head = "| Method | Seeds | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|---:|" + "---:|" * len(COLUMNS)
    rows = [
        f"| {row_label(variant)} | {len(runs)} | "
        + " | ".join(format_cell([r[key] for r in runs]) for key, _ in COLUMNS)
        + " |"
        for variant, runs in results.items()
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
) -> Path:
    """report.md + metrics.json + curves_*.png in ``out_dir``; returns the markdown file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_curves(histories, out)
    first = next((runs[0] for runs in results.values() if runs), {})
    lines = [
        f"# Ranking evaluation: {context.get('dataset', '')}",
        "",
        "Mean ± sample std over seeds (Hi-SAM Table 2 layout; docs/method.md §5).",
        "",
        metrics_table(results),
        "",
        "## Setup",
        "",
        *(f"- {k}: {v}" for k, v in context.items()),
        (
            f"- scored rows: {first.get('rows', 0)}, of cold users: {first.get('cold_user_rows', 0)}, "
            f"of cold items: {first.get('cold_item_rows', 0)}"
        ),
        "",
        "## Training curves",
        "",
        *(f"![{p.stem}]({p.name})" for p in figures),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "metrics.json").write_text(json.dumps({"context": dict(context), "results": results}, indent=2, default=str))
    return path
