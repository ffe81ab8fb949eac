"""The item-cold-start split leaks nothing (recipes/coldstart, docs/method.md §5 "Item cold start").

No training interaction, behaviour vector, training sequence, evaluation history or
tokenizer fit may use a held-out item's interactions; and the jobs refuse to mix a model
of the split with a tokenizer or evaluation of another.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data import Dataset
from data.behaviour import Item2VecConfig, item2vec
from data.dataset import find_cold_items
from hisam import cli
from models.hmat.baselines import id_codes
from recipes.coldstart import SplitMismatch, check_split, fit_items, item_cold_split, split_record, tokenizer_split
from recipes.coldstart.split import candidate_items
from recipes.coldstart.tokenizer import train_split_tokenizer
from recipes.ranker import eval_set, training_sequences
from recipes.tokenizer.train import TrainConfig
from recipes.tokenizer.variants import train_variant

TINY = {"dim": 32, "hidden": 64, "codebook_size": 16}


def test_split_holds_out_a_seeded_share_of_items_with_test_rows(toy: Dataset) -> None:
    split, held = item_cold_split(toy, share=0.2, seed=0)
    pool = candidate_items(toy)
    assert len(held) == round(0.2 * len(pool)) and np.isin(held, pool).all()
    assert np.isin(held, toy.test["item_idx"]).all() and np.isin(held, toy.train["item_idx"]).all()
    assert np.array_equal(item_cold_split(toy, 0.2, 0)[1], held)  # seeded
    assert not np.array_equal(item_cold_split(toy, 0.2, 1)[1], held)
    # Nothing of a held-out item is trained on; everything else of train, and all of test, stays.
    assert not split.train["item_idx"].isin(held).any()
    kept = toy.train[~toy.train["item_idx"].isin(held)]
    assert np.array_equal(split.train.to_numpy(), kept.to_numpy())
    assert np.array_equal(split.test.to_numpy(), toy.test.to_numpy())
    n = len(split.train)
    assert split.train.equals(split.interactions.iloc[:n]) and split.test.equals(split.interactions.iloc[n:])
    assert np.array_equal(split.interactions.index, np.arange(len(split.interactions)))
    # The catalogue keeps every item and its content.
    assert split.n_items == toy.n_items and split.items.external_ids == toy.items.external_ids
    for m in ("text", "metadata"):
        assert np.array_equal(split.items.features[m], toy.items.features[m])
    # Cold sets from the reduced train: the held-out items join the items that had no training row.
    assert np.array_equal(split.cold_items, np.union1d(toy.cold_items, held))
    assert np.array_equal(split.cold_items, find_cold_items(split.train, split.n_items))
    with pytest.raises(ValueError, match="share"):
        item_cold_split(toy, share=1.0)


def test_behaviour_is_rebuilt_without_the_held_out_items(toy: Dataset) -> None:
    split, held = item_cold_split(toy, share=0.2, seed=0)
    config = Item2VecConfig(dim=toy.items.features["behaviour"].shape[1])
    expected, expected_present = item2vec(toy.train[~toy.train["item_idx"].isin(held)], toy.n_items, config)
    beh, present = split.items.features["behaviour"], split.items.present["behaviour"]
    assert np.array_equal(beh, expected) and np.array_equal(present, expected_present)
    assert not present[held].any() and not beh[held].any()
    # Built from the whole train, the held-out items would have had vectors (what the split removes).
    full, full_present = item2vec(toy.train, toy.n_items, config)
    assert full_present[held].all()
    warm = np.setdiff1d(np.flatnonzero(present), held)
    assert not np.allclose(full[warm], beh[warm])  # the other items lose the removed co-occurrences too


def test_training_sequences_and_eval_histories_never_hold_a_held_out_item(toy: Dataset) -> None:
    split, held = item_cold_split(toy, share=0.3, seed=2)
    codes = id_codes(split.n_items)  # code = item index, so the streams name their items
    profiles = np.zeros((split.n_users, 1), dtype=np.int64)
    for seq in training_sequences(split, codes, profiles, max_items=8):
        assert not np.isin(seq.sids.numpy().ravel(), held).any()
    evals = eval_set(split, codes, profiles, max_items=8, protocol="stream")
    assert all(not np.isin(tl.sids.numpy().ravel(), held).any() for tl in evals.timelines)
    # The held-out items are scored: their test rows are all there.
    assert np.isin(held, evals.item_idx).all()
    assert len(evals) == len(split.test)


def _with_held_out_content_changed(ds: Dataset, held: np.ndarray) -> Dataset:
    rng = np.random.default_rng(7)
    features = dict(ds.items.features)
    for m in ("text", "metadata"):
        x = features[m].copy()
        x[held] = rng.normal(size=(len(held), x.shape[1])).astype(np.float32) * 5
        features[m] = x
    return dataclasses.replace(ds, items=dataclasses.replace(ds.items, features=features))


def test_split_tokenizer_is_fitted_without_the_held_out_items(toy: Dataset, tmp_path: Path) -> None:
    """Changing the held-out items' content changes nothing in the fitted weights (the version hashes them)."""
    split, held = item_cold_split(toy, share=0.2, seed=0)
    record = split_record(0.2, 0, held)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=0, progress=False, warmup_steps=2, refit_epochs=1)
    assert not np.isin(held, fit_items(split)).any() and len(fit_items(split)) == split.n_items - len(split.cold_items)
    a = train_split_tokenizer("dst", split, record, tmp_path / "a", cfg, TINY)
    changed = _with_held_out_content_changed(split, held)
    b = train_split_tokenizer("dst", changed, record, tmp_path / "b", cfg, TINY)
    assert a.version == b.version
    # The same change does reach a tokenizer fitted on every item (so the check above can fail).
    c = train_variant("dst", split, tmp_path / "c", cfg, TINY)
    d = train_variant("dst", changed, tmp_path / "d", cfg, TINY)
    assert c.version != d.version
    meta = json.loads((tmp_path / "a" / "dst" / "config.json").read_text())
    assert meta["fit_items"] == split.n_items - len(split.cold_items)
    assert tokenizer_split(tmp_path / "a" / "dst") == record.to_dict()
    assert tokenizer_split(tmp_path / "c" / "dst") is None
    check_split("tokenizer", tokenizer_split(tmp_path / "a" / "dst"), record)
    with pytest.raises(SplitMismatch, match="no item-cold split"):
        check_split("tokenizer", tokenizer_split(tmp_path / "c" / "dst"), record)
    with pytest.raises(SplitMismatch):
        check_split("tokenizer", record.to_dict(), split_record(0.2, 1, item_cold_split(toy, 0.2, 1)[1]))


def test_split_end_to_end_train_evaluate_report(toy_dir: Path, toy_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Split -> tokenizer on it -> a tiny HMAT and ID-only model on it -> evaluation -> the report's new columns."""
    data = ["--dataset", str(toy_dir), "--no-progress"]
    split = ["--item-cold-share", "0.3", "--item-cold-seed", "0"]
    toks = tmp_path / "tok"
    tok_args = ["--tokenizers-dir", str(toks), "--epochs", "2", "--batch-size", "32"]
    tok_args += [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    assert cli.main(["tokenizer", "train", *data, *split, *tok_args]) == 0
    out = tmp_path / "runs"
    common = [*data, "--tokenizer", str(toks / "dst"), "--out", str(out)]
    train = ["--variant", "hmat", "id", "--seeds", "0", "--max-items", "6", "--epochs", "1", "--batch-size", "16"]
    train += ["--warmup-steps", "2"]
    # A tokenizer fitted on the whole dataset saw the held-out items: refused for the split.
    no_split_tok = [*data, "--tokenizer", str(toy_tokenizer_dir), "--out", str(tmp_path / "other")]
    assert cli.main(["ranker", "finetune", *no_split_tok, *split, *train]) == 1
    assert cli.main(["ranker", "finetune", *common, *split, *train]) == 0
    saved = json.loads((out / "hmat" / "seed0" / "finetune" / "config.json").read_text())
    assert saved["item_cold_split"]["share"] == 0.3 and saved["item_cold_split"]["seed"] == 0
    # Evaluating split-trained models on the whole dataset (or another split) is refused.
    assert cli.main(["ranker", "eval", *common]) == 1
    assert cli.main(["ranker", "eval", *common, "--item-cold-share", "0.3", "--item-cold-seed", "1"]) == 1
    assert cli.main(["ranker", "eval", *common, *split, "--cold-k", "3", "--bootstrap", "200"]) == 0

    report = (out / "report" / "report.md").read_text()
    assert "| Cold-item AUC | Cold-item GAUC | Cold-item Recall@3 | Cold-item NDCG@3 |" in report
    assert "## Paired differences" in report
    assert "HMAT (H-RoPE + MA-Attn) − ID-based transformer (SASRec/HSTU-style) | 0 |" in report
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for runs in metrics["results"].values():
        for key in ("cold_item_gauc", "cold_item_recall", "cold_item_ndcg"):
            assert math.isfinite(runs[0][key]) and 0.0 <= runs[0][key] <= 1.0
        assert runs[0]["cold_item_k"] == 3
    [paired] = metrics["paired"]
    assert (paired["label"], paired["reference"], paired["seed"]) == ("hmat", "id", 0)
    for key in ("gauc", "cold_item_gauc", "cold_item_recall", "cold_item_ndcg"):
        diff, lo, hi = paired[key]
        assert all(math.isfinite(v) for v in (diff, lo, hi)) and lo <= hi
    hmat, ident = metrics["results"]["hmat"][0], metrics["results"]["id"][0]
    assert paired["cold_item_gauc"][0] == pytest.approx(hmat["cold_item_gauc"] - ident["cold_item_gauc"])
    assert "item-cold split share 0.3 seed 0" in report
