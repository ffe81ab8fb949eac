"""The bring-your-own format (data/FORMAT.md): round trip and every error case."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import DatasetError, load_dataset

Writer = Callable[..., Path]


def _interactions() -> pd.DataFrame:
    # 20 rows, ids that look numeric but must stay strings ("007" is not "7")
    users = ["007", "7", "a", "b"] * 5
    items = ["x1", "x2", "x3", "x1", "x2"] * 4
    return pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "rating": [5, 1, 4, 3, 2] * 4,
            "timestamp": [1000 - 10 * i for i in range(20)],  # written newest first
            "source": ["web"] * 20,  # extra columns are ignored
        }
    )


def test_round_trip(write_custom: Writer) -> None:
    rng = np.random.default_rng(0)
    text = rng.normal(size=(2, 5)).astype(np.float32)
    image = rng.normal(size=(4, 3))  # float64 on disk: read as float32
    root = write_custom(
        interactions=_interactions(),
        items=pd.DataFrame(
            {
                "item_id": ["x3", "x2", "x1", "x9"],
                "title": ["Three", "Two", "One", "Nine"],
                "brand": ["p", "q", "r", "s"],
            }
        ),
        users=pd.DataFrame({"user_id": ["b", "a", "7", "007", "zz"], "age": [30, 40, 50, 60, 70]}),
        embeddings={"text": (["x1", "x9"], text), "image": (["x9", "x1", "x2", "x3"], image)},
    )
    ds = load_dataset(str(root))

    assert ds.name == "toy"
    assert ds.items.external_ids == ["x3", "x2", "x1", "x9"]  # items.csv order
    assert ds.items.titles == ["Three", "Two", "One", "Nine"]
    assert ds.items.meta.columns.tolist() == ["title", "brand"]
    assert ds.items.meta["brand"].tolist() == ["p", "q", "r", "s"]
    assert ds.users["external_id"].tolist() == ["b", "a", "7", "007", "zz"]
    assert ds.users["age"].tolist() == [30, 40, 50, 60, 70]

    assert sorted(ds.items.modalities) == ["image", "text"]
    row = ds.items.row_of
    np.testing.assert_array_equal(ds.items.features["text"][row["x1"]], text[0])
    np.testing.assert_array_equal(ds.items.features["text"][row["x9"]], text[1])
    assert ds.items.present["text"].tolist() == [False, False, True, True]
    assert not ds.items.features["text"][[row["x3"], row["x2"]]].any()
    np.testing.assert_allclose(ds.items.features["image"][row["x2"]], image[2], rtol=1e-6)
    assert ds.items.features["image"].dtype == np.float32
    assert ds.items.present["image"].all()

    # interactions: every source row, mapped back to its ids, now in time order
    src = _interactions().sort_values("timestamp", kind="stable").reset_index(drop=True)
    back = pd.DataFrame(
        {
            "user_id": ds.users["external_id"].to_numpy()[ds.interactions["user_idx"]],
            "item_id": np.array(ds.items.external_ids)[ds.interactions["item_idx"]],
            "rating": ds.interactions["rating"].astype(float),
            "timestamp": ds.interactions["timestamp"],
        }
    )
    pd.testing.assert_frame_equal(back, src[["user_id", "item_id", "rating", "timestamp"]], check_dtype=False)
    assert (ds.interactions["label"] == (src["rating"] > 3)).all()
    assert len(ds.train) == 18 and len(ds.test) == 2
    assert ds.cold_users.tolist() == list(range(5))  # nobody has 10 training rows
    assert ds.cold_items.tolist() == [row["x9"]]


def test_optional_files_absent_use_first_appearance(write_custom: Writer) -> None:
    ds = load_dataset(str(write_custom(interactions=_interactions())))
    # first appearance in the file (not in time order)
    assert ds.items.external_ids == ["x1", "x2", "x3"]
    assert ds.users["external_id"].tolist() == ["007", "7", "a", "b"]
    assert ds.items.titles == ["", "", ""]
    assert ds.items.modalities == []


def test_label_column_and_iso_timestamps(write_custom: Writer) -> None:
    df = pd.DataFrame(
        {
            "user_id": ["u", "u", "v"],
            "item_id": ["a", "b", "a"],
            "rating": [1, 1, 5],
            "timestamp": ["2024-01-01T00:00:10Z", "2024-01-01T00:00:00Z", "2024-01-01T01:00:00+01:00"],
            "label": [1, 0, 0],
        }
    )
    ds = load_dataset(str(write_custom(interactions=df)))
    t0 = 1_704_067_200  # 2024-01-01T00:00:00Z
    assert ds.interactions["timestamp"].tolist() == [t0, t0, t0 + 10]
    assert ds.interactions["label"].tolist() == [0, 0, 1]  # the label column, not rating > 3


def test_relative_to_data_dir(write_custom: Writer, tmp_path: Path) -> None:
    write_custom(interactions=_interactions(), name="mine")
    assert load_dataset("mine", data_dir=tmp_path).name == "mine"


def _emb(ids: list[str], x: np.ndarray) -> dict[str, tuple[list[str], np.ndarray]]:
    return {"text": (ids, x)}


ITEMS = pd.DataFrame({"item_id": ["x1", "x2", "x3"]})


@pytest.mark.parametrize(
    ("case", "kwargs", "match"),
    [
        (
            "missing column",
            {"interactions": _interactions().drop(columns=["rating"])},
            r"interactions\.csv: missing column\(s\) rating",
        ),
        (
            "bad rating",
            {"interactions": _interactions().assign(rating=["5"] * 19 + ["great"])},
            r"interactions\.csv: column rating, row 21: 'great'",
        ),
        (
            "nan rating",
            {"interactions": _interactions().assign(rating=[5.0] * 3 + [np.nan] + [5.0] * 16)},
            r"column rating, row 5",
        ),
        (
            "bad label",
            {"interactions": _interactions().assign(label=[0] * 19 + [2])},
            r"column label, row 21: '2' is not 0 or 1",
        ),
        (
            "bad timestamp",
            {"interactions": _interactions().assign(timestamp=[1] * 19 + ["soon"])},
            r"column timestamp, row 21: 'soon'",
        ),
        (
            "empty item id",
            {"interactions": _interactions().assign(item_id=["x1"] * 19 + [""])},
            r"interactions\.csv: row 21 has an empty item_id",
        ),
        (
            "unknown item in interactions",
            {"interactions": _interactions(), "items": pd.DataFrame({"item_id": ["x1", "x2"]})},
            r"interactions\.csv: row 4: item_id 'x3' is not in .*items\.csv",
        ),
        (
            "unknown user in interactions",
            {"interactions": _interactions(), "users": pd.DataFrame({"user_id": ["007", "a", "b"]})},
            r"row 3: user_id '7' is not in .*users\.csv",
        ),
        (
            "duplicate item ids",
            {"items": pd.DataFrame({"item_id": ["x1", "x2", "x1"]})},
            r"items\.csv: duplicate item_id 'x1' at row 4",
        ),
        (
            "duplicate user ids",
            {"users": pd.DataFrame({"user_id": ["a", "b", "b"]})},
            r"users\.csv: duplicate user_id 'b' at row 4",
        ),
        (
            "nan embedding",
            {"embeddings": _emb(["x1", "x2"], np.array([[0.0, 1.0], [np.nan, 0.0]]))},
            r"text\.npz: row 1 \(id 'x2'\) has NaN or inf",
        ),
        (
            "inf embedding",
            {"embeddings": _emb(["x1"], np.array([[np.inf, 1.0]]))},
            r"text\.npz: row 0 \(id 'x1'\) has NaN or inf",
        ),
        (
            "duplicate embedding ids",
            {"embeddings": _emb(["x1", "x1"], np.zeros((2, 2)))},
            r"text\.npz: duplicate id 'x1' at row 1",
        ),
        (
            "embedding for unknown item",
            {"embeddings": _emb(["x1", "nope"], np.zeros((2, 2)))},
            r"text\.npz: row 1: id 'nope' is not a known item",
        ),
        (
            "length mismatch",
            {"embeddings": _emb(["x1", "x2"], np.zeros((3, 2)))},
            r"text\.npz: 2 ids but 3 embedding rows",
        ),
        (
            "1-D embeddings",
            {"embeddings": _emb(["x1", "x2"], np.zeros(2))},
            r"text\.npz: embeddings must be a 2-D numeric array",
        ),
    ],
)
def test_errors_name_file_and_place(write_custom: Writer, case: str, kwargs: dict, match: str) -> None:
    kwargs.setdefault("interactions", _interactions())
    if "items" not in kwargs and "embeddings" in kwargs:
        kwargs["items"] = ITEMS
    root = write_custom(**kwargs)
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(root))


def test_missing_interactions_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty/interactions\.csv: required file is missing"):
        load_dataset(str(tmp_path / "empty"))


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'nosuch'"):
        load_dataset("nosuch", data_dir=tmp_path)


def test_pickled_ids_are_refused(write_custom: Writer) -> None:
    root = write_custom(interactions=_interactions())
    (root / "item_embeddings").mkdir()
    np.savez(root / "item_embeddings" / "text.npz", ids=np.array(["x1", 2], dtype=object), embeddings=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match=r"text\.npz: cannot be read without pickle"):
        load_dataset(str(root))


def test_npz_missing_array_and_bad_name(write_custom: Writer) -> None:
    root = write_custom(interactions=_interactions())
    emb = root / "item_embeddings"
    emb.mkdir()
    np.savez(emb / "text.npz", ids=np.array(["x1"]))
    with pytest.raises(DatasetError, match=r"text\.npz: missing array\(s\) embeddings"):
        load_dataset(str(root))
    (emb / "text.npz").unlink()
    np.save(emb / "text.npy", np.zeros((1, 2)))
    with pytest.raises(DatasetError, match=r"text\.npy: expected <modality>\.npz"):
        load_dataset(str(root))


def test_empty_interactions(write_custom: Writer) -> None:
    root = write_custom(interactions=pd.DataFrame(columns=["user_id", "item_id", "rating", "timestamp"]))
    with pytest.raises(DatasetError, match=r"interactions\.csv: no interactions"):
        load_dataset(str(root))
