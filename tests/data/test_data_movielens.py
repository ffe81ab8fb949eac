"""ML-100K: parsing and modality building on a tiny file set in its format, then the real thing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import DatasetFetchError, load_dataset
from data.behaviour import item2vec
from data.movielens import build_ml100k, fetch_raw
from data.text import TEXT_DIM

ITEM_LINES = [
    "1\tToy Story\t1995\tAnimation Children's Comedy",
    "2\tGoldenEye\t1995\tAction Adventure Thriller",
    "3\tunkonwn\tunkonwn\tunknown",  # the source's placeholder row (item 267 upstream)
    "4\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's",  # item 1412
    "5\tGood Morning\t1971\tunknown",  # item 1373: a year but no genre
    "6\tNever Watched\t1980\tDrama",
]


def _inter_lines(seed: int = 0, rewrite_test: bool = False) -> list[str]:
    """60 interactions of 6 users over items 1, 2, 4, 5; item 3 appears only in the last 10%."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(60):
        user, item, rating = int(rng.integers(1, 7)), int(rng.choice([1, 2, 4, 5])), int(rng.integers(1, 6))
        if k >= 54:  # the test part (timestamps increase with k)
            item = 3
            if rewrite_test:
                user, item, rating = 7 - user, int(rng.choice([1, 2, 3])), 6 - rating
        rows.append(f"{user}\t{item}\t{rating}\t{880000000 + 100 * k}")
    order = np.random.default_rng(seed + 1).permutation(60)  # the file is not in time order
    return [rows[i] for i in order]


def _write_raw(root: Path, inter_lines: list[str]) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "\n".join(ITEM_LINES) + "\n"
    )
    (raw / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "\n".join(f"{u}\t{20 + u}\t{'MF'[u % 2]}\twriter\t0000{u}" for u in range(1, 7))
        + "\n"
    )
    (raw / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(inter_lines) + "\n"
    )
    return root


def test_tiny_ml100k_parsing_and_modalities(tmp_path: Path) -> None:
    ds = build_ml100k(_write_raw(tmp_path / "ml-100k", _inter_lines()), progress=False)
    it = ds.items
    assert it.external_ids == ["1", "2", "3", "4", "5", "6"]
    assert it.titles[2] == "" and it.titles[0] == "Toy Story"
    assert it.meta["year"].tolist()[:2] == [1995, 1995]
    assert pd.isna(it.meta["year"][2])
    assert it.meta["year"][3] == 1995  # recovered from the title
    assert it.meta["genres"][4] == [] and it.meta["genres"][0] == ["Animation", "Children's", "Comedy"]
    assert ds.users.columns.tolist() == ["external_id", "age", "gender", "occupation"]
    assert ds.users["age"].tolist() == [21, 22, 23, 24, 25, 26]

    assert it.features["text"].shape == (6, TEXT_DIM)
    assert it.present["text"].tolist() == [True, True, False, True, True, True]
    assert not it.features["text"][2].any()
    assert it.present["metadata"].tolist() == [True, True, False, True, True, True]
    assert it.present["behaviour"].tolist() == [True, True, False, True, True, False]  # 3: test only; 6: never
    assert it.features["behaviour"].shape[1] == 64

    assert len(ds.train) == 54 and len(ds.test) == 6
    assert ds.interactions["timestamp"].is_monotonic_increasing
    assert ds.cold_items.tolist() == [2, 5]
    counts = np.bincount(ds.train["user_idx"], minlength=6)
    assert ds.cold_users.tolist() == np.flatnonzero(counts < 10).tolist()


def test_tiny_ml100k_behaviour_does_not_see_test(tmp_path: Path) -> None:
    a = build_ml100k(_write_raw(tmp_path / "a" / "ml-100k", _inter_lines()), progress=False)
    b = build_ml100k(_write_raw(tmp_path / "b" / "ml-100k", _inter_lines(rewrite_test=True)), progress=False)
    assert not a.test.reset_index(drop=True).equals(b.test.reset_index(drop=True))
    pd.testing.assert_frame_equal(a.train, b.train)
    for m in ("text", "behaviour", "metadata"):
        np.testing.assert_array_equal(a.items.features[m], b.items.features[m])
        np.testing.assert_array_equal(a.items.present[m], b.items.present[m])


def test_fetch_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr("data.movielens.subprocess.run", failing_pip)
    with pytest.raises(DatasetFetchError, match=r"(?s)recbole==1\.2\.1.*pip exited 1.*No matching distribution"):
        fetch_raw(tmp_path / "ml-100k")
    assert not (tmp_path / "ml-100k" / "raw").exists()


@pytest.mark.slow
def test_real_ml100k(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetches the recbole wheel and embeds 1,681 titles the first time (~15 s on 2 cores)."""
    ds = load_dataset("ml-100k", data_dir, progress=False)
    assert (ds.n_items, ds.n_users, len(ds.interactions)) == (1682, 943, 100_000)
    assert (len(ds.train), len(ds.test)) == (90_000, 10_000)
    assert ds.train["timestamp"].max() <= ds.test["timestamp"].min()
    assert ds.interactions["label"].sum() == (ds.interactions["rating"] > 3).sum() == 55_375
    assert {m: x.shape[1] for m, x in ds.items.features.items()} == {"text": 384, "behaviour": 64, "metadata": 28}
    assert ds.items.present["text"].sum() == 1681  # all but the placeholder item 267
    np.testing.assert_array_equal(~ds.items.present["behaviour"], np.isin(ds.items.ids, ds.cold_items))
    assert len(ds.cold_items) == 45 and len(ds.cold_users) == 77

    # behaviour is exactly item2vec of the train split (nothing else went in)
    emb, _ = item2vec(ds.train, ds.n_items)
    np.testing.assert_allclose(ds.items.features["behaviour"], emb, atol=1e-6)

    # a second load is served from the caches: the encoder is never loaded
    monkeypatch.setattr("data.text._load_encoder", lambda device: pytest.fail("text cache miss"))
    t0 = time.perf_counter()
    again = load_dataset("ml-100k", data_dir, progress=False)
    assert time.perf_counter() - t0 < 30  # generous: only guards against a silent rebuild
    for m in ds.items.modalities:
        np.testing.assert_array_equal(again.items.features[m], ds.items.features[m])
    pd.testing.assert_frame_equal(again.interactions, ds.interactions)
