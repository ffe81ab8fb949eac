"""The honest replay's pieces: a warm start trained on a time prefix only, and the benchmark's figures.

``hisam ranker finetune --train-until F`` (hisam/jobs/ranker_common.time_prefix) trains on
the first fraction F of the timeline; ``hisam bench trainer`` replays what follows and
reports near-line vs frozen overall and per segment with the paired difference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data.dataset import ItemTable, assemble, prepare_interactions
from hisam.bench.trainer import prequential_figures, table
from recipes.ranker import training_sequences
from recipes.ranker.runs import time_prefix


def toy_dataset(n: int = 100, users: int = 4, items: int = 5):
    rng = np.random.default_rng(0)
    table_ = ItemTable(
        ids=np.arange(items, dtype=np.int64),
        external_ids=[f"i{i}" for i in range(items)],
        features={},
        present={},
        titles=[""] * items,
        meta=pd.DataFrame(index=range(items)),
    )
    people = pd.DataFrame({"external_id": [f"u{u}" for u in range(users)]})
    inter = prepare_interactions(
        rng.integers(0, users, n), rng.integers(0, items, n), rng.integers(1, 6, n), np.arange(n) * 60
    )
    return assemble("toy", table_, people, inter)


def test_time_prefix_trains_on_the_earlier_events_only() -> None:
    ds = toy_dataset()
    cut = time_prefix(ds, 0.5)
    assert len(cut.train) == 50 and cut.train.index.max() == 49  # the first half of the timeline
    assert cut.interactions is ds.interactions and cut.test.equals(ds.test)  # evaluation is unchanged
    codes, profiles = np.zeros((5, 2), np.int64), np.zeros((4, 1), np.int64)
    seqs = training_sequences(cut, codes, profiles, max_items=8)
    assert sum(len(s.actions) for s in seqs) == 50
    assert time_prefix(ds, None) is ds and len(time_prefix(ds, 1.0).train) == len(ds.train)  # at most the split
    with pytest.raises(ValueError, match="train-until"):
        time_prefix(ds, 0.0)


def score_log(n_batches: int = 10, per_batch: int = 200, gain: float = 0.0):
    """Synthetic prequential rows: the candidate's signal grows by ``gain`` per batch over the frozen one."""
    rng = np.random.default_rng(1)
    rows = []
    for k in range(n_batches):
        u = rng.integers(0, 30, per_batch)
        y = (rng.random(per_batch) < 0.5).astype(np.int64)
        noise = rng.normal(size=per_batch)
        frozen = 0.8 * y + noise
        candidate = (0.8 + gain * k) * y + noise + 0.1 * rng.normal(size=per_batch)
        rows.append((u, y, {"serving": frozen, "candidate": candidate, "frozen": frozen}))
    return rows


def test_prequential_figures_show_the_trend_per_segment() -> None:
    figs = prequential_figures(score_log(gain=0.1), segment_size=500, known_users=set(range(15)))
    segs = figs["segments"]
    assert [s["rows"] for s in segs] == [[0, 500], [500, 1000], [1000, 1500], [1500, 2000]]
    d = [s["d_auc"]["diff"] for s in segs]
    assert d == sorted(d) and d[0] < 0.03 < d[-1] and segs[-1]["d_auc"]["lower"] > 0  # the gain grows with time
    whole = figs["whole_replay"]
    assert whole["rows"] == [0, 2000] and 0.4 < whole["new_user_share"] < 0.6  # users 15..29 unseen
    assert whole["d_auc"]["diff"] == pytest.approx(whole["candidate"]["auc"] - whole["frozen"]["auc"])
    assert whole["d_gauc"] == pytest.approx(whole["candidate"]["gauc"] - whole["frozen"]["gauc"])
    flat = prequential_figures(score_log(gain=0.0), segment_size=500, known_users=set())
    assert flat["whole_replay"]["d_auc"]["lower"] < 0 < flat["whole_replay"]["d_auc"]["upper"]  # no gain: none shown
    assert len(prequential_figures(score_log(), segment_size=600, known_users=set())["segments"]) == 3  # 200 folded
    text = table(
        {
            "prequential": figs,
            "samples_per_s": {"model": 10.0, "end_to_end": 9.0},
            "device": "cpu",
            "precision": "fp32",
            "threads": 1,
            "loadavg_1m": {"before": 1.0, "after": 2.0},
        }
    )
    assert "whole replay" in text and "1500-2000" in text
