"""``hisam data prepare`` on raw files: text, behaviour and metadata built, precedence, dropping, spec errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import DatasetError, load_dataset
from data.metadata import table_features
from data.prepare import PrepareSpec, item_texts, read_spec
from hisam import cli

Writer = Callable[..., Path]
TOPICS = {"kitchen": ["Kettle", "Skillet", "Blender"], "garden": ["Rake", "Hose", "Planter"]}


def _catalogue(n_items: int = 48, n: int = 2400, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items of two topics (titles and categories follow the topic); users stick to one topic."""
    rng = np.random.default_rng(seed)
    topic = np.arange(n_items) % 2
    names = list(TOPICS)
    items = pd.DataFrame(
        {
            "item_id": [f"it{i}" for i in range(n_items)],
            "title": [f"{TOPICS[names[t]][i % 3]} model {i}" for i, t in enumerate(topic)],
            "categories": [f"{names[t]}|{'pro' if i % 4 < 2 else 'home'}" for i, t in enumerate(topic)],
        }
    )
    users = rng.integers(0, 60, n)
    picks = rng.integers(0, n_items // 2, n) * 2 + users % 2  # user u only sees topic u % 2
    interactions = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"it{i}" for i in picks],
            "rating": rng.integers(1, 6, n),
            "timestamp": 1_700_000_000 + np.arange(n) * 60,
        }
    )
    return items, interactions


def test_raw_files_get_three_modalities_and_train_a_tokenizer(
    write_custom: Writer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recipes.tokenizer.train import TrainConfig
    from recipes.tokenizer.variants import train_variant

    items, interactions = _catalogue()
    root = write_custom(interactions=interactions, items=items)  # only the two CSV files
    assert sorted(p.name for p in root.iterdir()) == ["interactions.csv", "items.csv"]
    argv = ["data", "prepare", "--dataset", str(root), "--data-dir", str(tmp_path / "d"), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "modality text            dim 384, coverage 48/48 (100.0%)" in out
    assert "modality metadata        dim 4, coverage 48/48 (100.0%)" in out
    assert "modality behaviour       dim 64, coverage 48/48 (100.0%)" in out
    spec = json.loads((root / "dataset.json").read_text())
    assert spec["text_columns"] == ["title", "categories"] and spec["categorical"] == ["categories"]

    ds = load_dataset(str(root), tmp_path / "d")  # a later command: dataset.json says what to build, caches hit
    assert sorted(ds.items.modalities) == ["behaviour", "metadata", "text"]
    x = ds.items.features
    np.testing.assert_allclose(np.linalg.norm(x["text"], axis=1), 1.0, rtol=1e-5)
    # metadata: multi-hot over the sorted values garden, home, kitchen, pro
    assert x["metadata"][0].tolist() == [0.0, 0.0, 1.0, 1.0]  # it0: kitchen|pro
    assert x["metadata"][3].tolist() == [1.0, 1.0, 0.0, 0.0]  # it3: garden|home
    # behaviour separates the two topics that users keep to; so does the text of the titles
    topic = np.arange(48) % 2
    for m in ("behaviour", "text"):
        sim = x[m] @ x[m].T
        same = sim[topic[:, None] == topic[None, :]].mean()
        other = sim[topic[:, None] != topic[None, :]].mean()
        assert same > other + 0.05, (m, same, other)

    tok = train_variant("dst", ds, tmp_path / "tok", TrainConfig(epochs=2, refit=False, progress=False))
    tokens = tok.encode({m: x[m][0] for m in ds.items.modalities})
    assert tokens.shape == (6,)


def test_precomputed_file_takes_precedence(write_custom: Writer, tmp_path: Path) -> None:
    items, interactions = _catalogue()
    given = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    root = write_custom(interactions=interactions, items=items, embeddings={"text": (["it0", "it1", "it2"], given)})
    spec = PrepareSpec(build=("text", "behaviour"))
    ds = load_dataset(str(root), tmp_path, spec=spec)
    assert sorted(ds.items.modalities) == ["behaviour", "text"]
    np.testing.assert_array_equal(ds.items.features["text"][:3], given)  # the file, not the encoder (384-dim)
    assert ds.items.present["text"].sum() == 3
    assert "text" not in spec.timings and "behaviour" in spec.timings


def test_unknown_items_and_users_refused_or_dropped_and_counted(
    write_custom: Writer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items, interactions = _catalogue()
    interactions.loc[[3, 10], "item_id"] = ["ghost", "ghost2"]
    interactions.loc[[20, 3], "user_id"] = ["nobody", "nobody"]  # row 3: unknown item and user, counted once
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(60)]})
    root = write_custom(interactions=interactions, items=items, users=users)
    base = ["data", "prepare", "--dataset", str(root), "--data-dir", str(tmp_path), "--build", "metadata"]
    assert cli.main(base) == 1
    with pytest.raises(DatasetError, match=r"row 5: user_id 'nobody' is not in .*--drop-unknown-users"):
        load_dataset(str(root), tmp_path)  # dataset.json written, dropping still off
    assert cli.main([*base, "--drop-unknown-users"]) == 1  # the unknown items are still refused
    with pytest.raises(DatasetError, match=r"row 5: item_id 'ghost' is not in .*--drop-unknown-items"):
        load_dataset(str(root), tmp_path)
    capsys.readouterr()
    assert cli.main([*base, "--drop-unknown-items"]) == 0  # options accumulate in dataset.json
    out = capsys.readouterr().out
    assert "dropped (unknown item)   2" in out and "dropped (unknown user)   1" in out
    assert f"interactions             {len(interactions) - 3:,}" in out
    assert read_spec(root) == PrepareSpec(
        build=("metadata",), text_columns=("title", "categories"), categorical=("categories",),
        drop_unknown_items=True, drop_unknown_users=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"bild": ["text"]}', "unknown key 'bild'"),
        ('{"build": ["image"]}', "unknown modality 'image'"),
        ('{"numeric": "price"}', "numeric must be a list"),
        ('{"drop_unknown_items": "yes"}', "must be true or false"),
        ("[1, 2]", "expected a JSON object"),
        ("{", "not a readable JSON file"),
    ],
)
def test_bad_spec_is_refused(write_custom: Writer, tmp_path: Path, content: str, message: str) -> None:
    root = write_custom()
    (root / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(root), tmp_path)


def test_declared_columns_must_exist_and_numbers_must_be_numbers(write_custom: Writer, tmp_path: Path) -> None:
    items, interactions = _catalogue()
    items["price"] = ["9.5", "", "cheap"] + ["1"] * 45
    root = write_custom(interactions=interactions, items=items)
    with pytest.raises(DatasetError, match="metadata column 'brand' not found"):
        load_dataset(str(root), tmp_path, spec=PrepareSpec(build=("metadata",), categorical=("brand",)))
    with pytest.raises(DatasetError, match=r"column price, row 4: 'cheap' is not a finite number"):
        load_dataset(str(root), tmp_path, spec=PrepareSpec(build=("metadata",), numeric=("price",)))
    with pytest.raises(DatasetError, match="text column 'blurb' not found"):
        load_dataset(str(root), tmp_path, spec=PrepareSpec(build=("text",), text_columns=("blurb",)))


def test_table_features_one_hot_hashed_and_numeric() -> None:
    table = pd.DataFrame({"tags": ["a|b", None, "b", " c "], "price": [10.0, np.nan, 30.0, 20.0]})
    x, present, names = table_features(table, ["tags"], ["price"])
    assert names == ["price_z", "price_missing", "tags=a", "tags=b", "tags=c"]
    np.testing.assert_allclose(x[:, 0], [-np.sqrt(1.5), 0.0, np.sqrt(1.5), 0.0], rtol=1e-6)
    assert x[:, 2:].tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert present.tolist() == [True, False, True, True]  # row 1: no tag, no price -> zero row
    assert not x[1].any()

    many = pd.DataFrame({"brand": [f"b{i}" for i in range(50)] * 2})
    x, present, names = table_features(many, ["brand"], [], max_one_hot=10, hash_buckets=8)
    assert names == [f"brand#{i}" for i in range(8)] and x.shape == (100, 8)
    assert (x.sum(axis=1) == 1).all() and present.all()
    np.testing.assert_array_equal(x[:50], x[50:])  # the same value always lands in the same bucket
    assert len({tuple(r) for r in x[:50]}) > 4  # and values spread over the buckets


def test_item_texts_join_columns_and_skip_empty_items() -> None:
    table = pd.DataFrame(
        {"title": ["Toy Story", None, "Heat."], "genres": ["Animation|Comedy", None, ""], "tags": [None, None, "x"]}
    )
    texts, has = item_texts(table, ("title", "genres", "tags"), "|")
    assert texts == ["Toy Story. Genres: Animation, Comedy.", "", "Heat. Tags: x."]
    assert has.tolist() == [True, False, True]
