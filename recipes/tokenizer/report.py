"""The tokenizer report: a markdown table and two plots (utilisation per layer; the layer x
modality heatmap of Hi-SAM Fig. 3)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np

from recipes.tokenizer.variants import TokenizerReport


def _fmt(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def markdown_table(reports: list[TokenizerReport], modalities: list[str]) -> str:
    head = (
        "| tokenizer | collision rate | after resolution | utilisation per layer | perplexity per layer | "
        + " | ".join(f"recon FVU {m}" for m in modalities)
        + " | vCLUB MI (shared; specific m) |"
    )
    sep = "|" + "---|" * (6 + len(modalities))
    rows = [head, sep]
    for r in reports:
        mi = "; ".join(f"{m} {v:.3f}" for m, v in r.mi_shared_specific.items()) or "n/a"
        rows.append(
            f"| {r.name} | {r.collision_rate:.4f} | {r.collision_rate_resolved:.4f} | {_fmt(r.utilisation_per_layer)} | "
            f"{_fmt(r.perplexity_per_layer, 0)} | "
            + " | ".join(f"{r.recon_fvu.get(m, float('nan')):.3f}" for m in modalities)
            + f" | {mi} |"
        )
    return "\n".join(rows)


def plot_utilisation(reports: list[TokenizerReport], path: Path) -> None:
    """Two panels per layer: share of entries used, and perplexity / K (how evenly they are used)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    n = len(reports)
    width = 0.8 / max(n, 1)
    for ax, key, title in (
        (axes[0], "utilisation_per_layer", "Share of codebook entries used"),
        (axes[1], "perplexity_per_layer", "Perplexity / K (1 = perfectly even use)"),
    ):
        for i, r in enumerate(reports):
            values = np.asarray(getattr(r, key), dtype=float)
            if key == "perplexity_per_layer":
                values = values / r.codebook_size
            ax.bar(np.arange(len(values)) + i * width, values, width, label=r.name)
        ax.set_xticks(np.arange(len(reports[0].code_modalities)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{i + 1}:{c}" for i, c in enumerate(reports[0].code_modalities)], fontsize=7, rotation=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
    axes[0].axhline(0.9, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("share")
    axes[0].set_xlabel("code position (labels: the first tokenizer's layers)", fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncols=min(n, 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmaps(
    reports: list[TokenizerReport], modalities: list[str], path: Path, key: str = "association_unique"
) -> None:
    fig, axes = plt.subplots(1, len(reports), figsize=(2.6 * len(reports) + 1, 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports):
        mat = np.asarray(getattr(r, key))
        im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(0.05, float(mat.max())))
        ax.set_xticks(range(len(modalities)), modalities, rotation=45, fontsize=7)
        ax.set_yticks(
            range(len(r.code_modalities)), [f"{i + 1}:{c}" for i, c in enumerate(r.code_modalities)], fontsize=7
        )
        ax.set_title(r.name, fontsize=9)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < mat.max() * 0.6 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    what = "modality-unique part" if key == "association_unique" else "raw embedding"
    fig.suptitle(f"Code layer x modality association (epsilon^2 on each {what})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    reports: list[TokenizerReport], modalities: list[str], out_dir: Path, dataset: str, extra_md: str = ""
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_utilisation(reports, out_dir / "utilisation.png")
    plot_heatmaps(reports, modalities, out_dir / "heatmap_unique.png", "association_unique")
    plot_heatmaps(reports, modalities, out_dir / "heatmap_raw.png", "association_raw")
    (out_dir / "metrics.json").write_text(json.dumps([asdict(r) for r in reports], indent=2))
    md = [
        f"# Tokenizer report ({dataset})",
        "",
        (
            "Equal code length for every tokenizer. Collision rate: share of items whose full ID another item also "
            "has, before and after resolution. Utilisation: share of the K entries of each layer used by at least one "
            "item. Recon FVU: fraction of variance unexplained of each modality's reconstruction target (standardised "
            "raw input; `dst-paper` reconstructs the aligned vector). vCLUB MI: a fresh variational net fitted on half "
            "the items, bound evaluated on the other half, between the shared part z_hat_s and each specific part u_m."
        ),
        "",
        markdown_table(reports, modalities),
        "",
        "![utilisation](utilisation.png)",
        "",
        (
            "Layer x modality association (Hi-SAM Fig. 3), epsilon^2 of each modality's *unique* part (what the "
            "other modalities cannot predict) explained by the code of each layer; shared layers should be balanced, "
            "each specific layer should stand out on its own modality:"
        ),
        "",
        "![heatmap](heatmap_unique.png)",
        "",
        "The same on the raw embeddings (dominated by the consensus every modality shares):",
        "",
        "![heatmap raw](heatmap_raw.png)",
        "",
        extra_md,
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
