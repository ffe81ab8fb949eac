"""The evaluation protocol of docs/method.md §5: chronological 90/10 split, labels, cold sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data import DatasetError, ItemTable
from data.dataset import (
    assemble,
    find_cold_items,
    find_cold_users,
    n_train_of,
    prepare_interactions,
    split_chronological,
)


def _items(n: int) -> ItemTable:
    return ItemTable(
        ids=np.arange(n, dtype=np.int64),
        external_ids=[f"i{i}" for i in range(n)],
        features={},
        present={},
        titles=[""] * n,
        meta=pd.DataFrame(index=range(n)),
    )


def _users(n: int) -> pd.DataFrame:
    return pd.DataFrame({"external_id": [f"u{u}" for u in range(n)]})


def _random(n: int, n_users: int, n_items: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return prepare_interactions(
        user_idx=rng.integers(0, n_users, n),
        item_idx=rng.integers(0, n_items, n),
        rating=rng.integers(1, 6, n),
        timestamp=rng.integers(0, n // 3 + 1, n),  # many ties
    )


def test_sort_is_by_time_and_stable_on_ties() -> None:
    df = prepare_interactions(
        user_idx=np.array([0, 1, 2, 3, 4]),
        item_idx=np.array([0, 0, 0, 0, 0]),
        rating=np.array([1, 2, 3, 4, 5]),
        timestamp=np.array([30, 10, 30, 10, 20]),
    )
    # ties (10, 10) and (30, 30) keep their source order: users 1 before 3, 0 before 2
    assert df["user_idx"].tolist() == [1, 3, 4, 0, 2]
    assert df["timestamp"].tolist() == [10, 10, 20, 30, 30]
    assert list(df.index) == [0, 1, 2, 3, 4]
    assert df.dtypes.to_dict() == {
        "user_idx": np.int64,
        "item_idx": np.int64,
        "rating": np.float32,
        "label": np.int8,
        "timestamp": np.int64,
    }


def test_label_rule_is_rating_above_three() -> None:
    df = prepare_interactions(np.zeros(6), np.zeros(6), np.array([1, 2, 3, 3.5, 4, 5]), np.arange(6))
    assert df["label"].tolist() == [0, 0, 0, 1, 1, 1]


def test_explicit_label_overrides_rating_rule() -> None:
    df = prepare_interactions(np.zeros(3), np.zeros(3), np.array([5, 1, 4]), np.arange(3), label=np.array([0, 1, 0]))
    assert df["label"].tolist() == [0, 1, 0]


@pytest.mark.parametrize("n", [1, 9, 10, 11, 100, 1001])
def test_split_is_first_ninety_percent_globally(n: int) -> None:
    df = _random(n, n_users=5, n_items=7)
    train, test = split_chronological(df)
    assert len(train) == n * 9 // 10 == n_train_of(n)
    assert len(train) + len(test) == n
    # positional cut of the time-sorted frame: nothing in test is earlier than train
    if len(train) and len(test):
        assert train["timestamp"].max() <= test["timestamp"].min()
    pd.testing.assert_frame_equal(pd.concat([train, test]), df)


def test_split_refuses_unsorted_input() -> None:
    df = pd.DataFrame(
        {"user_idx": [0, 0], "item_idx": [0, 0], "rating": [1.0, 1.0], "label": [0, 0], "timestamp": [2, 1]}
    )
    with pytest.raises(DatasetError, match="sorted"):
        split_chronological(df)


def test_cold_users_are_those_with_fewer_than_ten_training_interactions() -> None:
    # user 0: 10 train rows (warm), user 1: 9 (cold), user 2: only test rows (cold), user 3: none (cold)
    users = [0] * 10 + [1] * 9 + [0, 2]
    df = prepare_interactions(np.array(users), np.zeros(len(users)), np.ones(len(users)), np.arange(len(users)))
    train = df.iloc[:19]  # the first 19 rows: user 0 x10, user 1 x9
    assert find_cold_users(train, n_users=4).tolist() == [1, 2, 3]
    assert find_cold_users(train, n_users=4).dtype == np.int64


def test_cold_items_are_those_without_training_interactions() -> None:
    df = prepare_interactions(np.zeros(5), np.array([0, 2, 0, 2, 3]), np.ones(5), np.arange(5))
    train = df.iloc[:4]
    assert find_cold_items(train, n_items=5).tolist() == [1, 3, 4]


def test_assemble_matches_the_definitions_on_random_data() -> None:
    n_users, n_items = 40, 30
    df = _random(2000, n_users, n_items, seed=3)
    ds = assemble("rand", _items(n_items), _users(n_users), df)
    assert len(ds.train) == 1800 and len(ds.test) == 200
    counts = ds.train.groupby("user_idx").size().reindex(range(n_users), fill_value=0)
    assert ds.cold_users.tolist() == sorted(counts[counts < 10].index.tolist())
    seen = set(ds.train["item_idx"])
    assert ds.cold_items.tolist() == [i for i in range(n_items) if i not in seen]
    assert (ds.interactions["label"] == (ds.interactions["rating"] > 3)).all()
    summary = ds.summary()
    assert summary["train"] == 1800 and summary["cold items"] == len(ds.cold_items)


def test_assemble_rejects_out_of_range_indices() -> None:
    df = prepare_interactions(np.array([0, 5]), np.array([0, 0]), np.ones(2), np.arange(2))
    with pytest.raises(DatasetError, match="user_idx out of range"):
        assemble("bad", _items(1), _users(2), df)


def test_item_table_checks_its_shapes() -> None:
    with pytest.raises(DatasetError, match="float32"):
        ItemTable(
            ids=np.arange(2, dtype=np.int64),
            external_ids=["a", "b"],
            features={"text": np.zeros((3, 4), dtype=np.float32)},
            present={"text": np.ones(2, dtype=bool)},
            titles=["", ""],
            meta=pd.DataFrame(index=range(2)),
        )
    with pytest.raises(DatasetError, match="duplicates"):
        ItemTable(
            ids=np.arange(2, dtype=np.int64),
            external_ids=["a", "a"],
            features={},
            present={},
            titles=["", ""],
            meta=pd.DataFrame(index=range(2)),
        )
