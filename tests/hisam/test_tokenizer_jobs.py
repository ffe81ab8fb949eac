"""`hisam tokenizer train|eval|encode` and `hisam bench tokenizer` as a user runs them, on real ML-100K."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from hisam.cli import main

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = os.environ.get("HISAM_DATA_DIR", str(REPO / "data"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizers")
    rc = main(
        [
            "tokenizer",
            "train",
            "--data-dir",
            DATA_DIR,
            "--tokenizers-dir",
            str(out),
            "--variant",
            "dst",
            "--variant",
            "rqvae",
            "--epochs",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_train_writes_artifacts_and_catalogue(tokenizers_dir):
    for name in ("dst", "rqvae"):
        meta = json.loads((tokenizers_dir / name / "config.json").read_text())
        assert meta["variant"] == name and meta["dataset"] == "ml-100k"
        assert meta["version"].startswith(meta["kind"] + "-")
        assert len([h for h in meta["training"]["history"] if "loss" in h]) == 2
        assert (tokenizers_dir / name / "model.safetensors").exists()
        assert (tokenizers_dir / name / "catalogue.npz").exists()


def test_eval_writes_report_with_table_and_plots(tokenizers_dir, tmp_path, capsys):
    rc = main(
        ["tokenizer", "eval", "--data-dir", DATA_DIR, "--tokenizers-dir", str(tokenizers_dir), "--out", str(tmp_path)]
    )
    assert rc == 0
    report = (tmp_path / "report.md").read_text()
    assert "| dst |" in report and "| rqvae |" in report
    for png in ("utilisation.png", "heatmap_unique.png", "heatmap_raw.png"):
        assert (tmp_path / png).stat().st_size > 5000
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    dst = next(m for m in metrics if m["name"] == "dst")
    assert dst["collision_rate_resolved"] == 0.0
    assert len(dst["utilisation_per_layer"]) == 6
    assert set(dst["mi_shared_specific"]) == {"text", "behaviour", "metadata"}


def test_encode_named_items_and_unknown_item(tokenizers_dir, tmp_path):
    out = tmp_path / "ids.csv"
    rc = main(
        [
            "tokenizer",
            "encode",
            "--data-dir",
            DATA_DIR,
            "--tokenizers-dir",
            str(tokenizers_dir),
            "--item",
            "1",
            "--item",
            "50",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["item_id"] for r in rows] == ["1", "50"]
    assert rows[0]["title"].startswith("Toy Story")
    assert all(int(rows[0][f"t{l}"]) // 256 == l for l in range(6))
    rc = main(
        ["tokenizer", "encode", "--data-dir", DATA_DIR, "--tokenizers-dir", str(tokenizers_dir), "--item", "nope"]
    )
    assert rc == 2


def test_eval_without_artifacts_says_what_to_do(tmp_path, caplog):
    rc = main(["tokenizer", "eval", "--data-dir", DATA_DIR, "--tokenizers-dir", str(tmp_path / "none")])
    assert rc == 2
    assert "hisam tokenizer train" in caplog.text
