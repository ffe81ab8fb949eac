"""``hisam bench data``: the synthetic catalogue's skew, and the bench end to end through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hisam import cli
from hisam.bench.data_synth import SynthConfig, synthetic_catalogue


def test_synthetic_catalogue_is_skewed_and_complete() -> None:
    items, interactions = synthetic_catalogue(SynthConfig(items=5000, interactions=100_000, seed=1))
    assert len(items) == 5000 and len(interactions) == 100_000
    assert items["item_id"].is_unique and set(interactions["item_id"]) <= set(items["item_id"])
    pop = interactions["item_id"].value_counts().to_numpy()
    assert pop[:50].sum() > 0.25 * len(interactions)  # 1% of the items take over a quarter of the interactions
    assert (pop == 1).sum() > 100  # and there is a long tail of items seen once
    activity = interactions["user_id"].value_counts().to_numpy()
    assert activity[0] > 20 * np.median(activity)  # long-tail users
    assert items["title"].str.len().min() > 5 and items["categories"].str.contains("|", regex=False).mean() > 0.3
    assert interactions["timestamp"].is_monotonic_increasing
    again, _ = synthetic_catalogue(SynthConfig(items=5000, interactions=100_000, seed=1))
    assert again.equals(items)  # seeded


def test_bench_data_prints_stages_and_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "data", "--items", "400", "--interactions", "6000", "--text-items", "40", "--no-progress"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    keys = (
        "behaviour_s",
        "text_s",
        "text_items_per_s",
        "tokenizer_epoch_s",
        "peak_rss_gb",
        "peak_rss_with_tokenizer_gb",
    )
    for key in keys:
        assert result[key] > 0, key
    assert result["metadata_s"] >= 0  # 400 items: well under the 1 ms it is rounded to
    assert result["peak_rss_with_tokenizer_gb"] >= result["peak_rss_gb"]
    assert result["items"] == 400 and result["interactions"] == 6000 and result["text_items"] == 40
    assert 0.5 < result["behaviour_coverage"] <= 1.0 and result["metadata_dim"] > 10
    for stage in ("generate", "load_csv", "behaviour", "metadata", "text", "tokenizer_epoch"):
        assert any(line.startswith(f"{stage} ") and "peak RSS" in line for line in lines), stage


def test_bench_data_refuses_a_degenerate_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "data", "--items", "1", "--interactions", "10"]) == 1
