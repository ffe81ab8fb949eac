"""Behaviour embeddings: item2vec as sparse PPMI + randomized SVD, learned from the training split only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data.behaviour import Item2VecConfig, cooccurrence, item2vec, item2vec_cached, ppmi
from data.dataset import prepare_interactions, split_chronological


def _train(users: list[int], items: list[int]) -> pd.DataFrame:
    return prepare_interactions(np.array(users), np.array(items), np.ones(len(users)), np.arange(len(users)))


def test_cooccurrence_matches_hand_count() -> None:
    # time order interleaves users: A sees 0, 1, 2; B sees 2, 0
    train = _train(users=[0, 1, 0, 1, 0], items=[0, 2, 1, 0, 2])
    c = cooccurrence(train, n_items=3, window=2, distance_weighting=True).toarray()
    expected = np.zeros((3, 3))
    for a, b, w in [(0, 1, 1.0), (1, 2, 1.0), (0, 2, 0.5), (2, 0, 1.0)]:
        expected[a, b] += w
        expected[b, a] += w
    np.testing.assert_allclose(c, expected)


def test_ppmi_matches_loop_reference() -> None:
    rng = np.random.default_rng(0)
    c = rng.integers(0, 4, (6, 6)).astype(float)
    c = c + c.T
    got = ppmi(c, smoothing=0.75).toarray()
    total, row, col = c.sum(), c.sum(1), c.sum(0) ** 0.75
    ref = np.zeros_like(c)
    for i in range(6):
        for j in range(6):
            if c[i, j] > 0:
                ref[i, j] = max(0.0, np.log((c[i, j] / total) / ((row[i] / total) * (col[j] / col.sum()))))
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def _two_worlds(n_users: int = 60, seed: int = 0) -> pd.DataFrame:
    """Users watch only items 0-9 or only items 10-19: behaviour should separate the two."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        base = 0 if u % 2 == 0 else 10
        for i in rng.permutation(10)[:6]:
            users.append(u)
            items.append(base + int(i))
    order = rng.permutation(len(users))
    return prepare_interactions(
        np.array(users)[order], np.array(items)[order], np.ones(len(users)), np.arange(len(users))
    )


def test_item2vec_separates_co_consumed_groups_and_is_unit_norm() -> None:
    emb, present = item2vec(_two_worlds(), n_items=22, config=Item2VecConfig(dim=8))
    assert emb.shape == (22, 8) and emb.dtype == np.float32
    assert present.tolist() == [True] * 20 + [False, False]  # 20, 21 never seen
    np.testing.assert_allclose(np.linalg.norm(emb[:20], axis=1), 1.0, rtol=1e-5)
    assert not emb[20:].any()
    sim = emb[:20] @ emb[:20].T
    within = (sim[:10, :10].sum() - 10) / 90
    across = sim[:10, 10:].mean()
    assert within > across + 0.5


def test_item2vec_matches_svd_reference() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    items = np.minimum(rng.zipf(1.3, n) - 1, 39)  # skewed popularity: a spectrum without ties
    train = prepare_interactions(rng.integers(0, 80, n), items, np.ones(n), np.arange(n))
    cfg = Item2VecConfig(dim=6)
    emb, present = item2vec(train, 40, cfg)
    active = np.flatnonzero(present)

    c = cooccurrence(train, 40, cfg.window, cfg.distance_weighting).toarray()[np.ix_(active, active)]
    u, s, _ = np.linalg.svd(ppmi(c, cfg.smoothing).toarray())
    assert (np.diff(s[:7]) < -1e-3 * s[0]).all()  # distinct singular values: vectors well defined
    ref = u[:, :6] * np.sqrt(s[:6])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    signs = np.sign((emb[active] * ref).sum(axis=0))  # singular vectors are defined up to sign
    np.testing.assert_allclose(emb[active], ref * signs, atol=1e-5)


def test_item2vec_is_deterministic() -> None:
    a, _ = item2vec(_two_worlds(), n_items=20)
    b, _ = item2vec(_two_worlds(), n_items=20)
    np.testing.assert_array_equal(a, b)


def test_no_leakage_changing_test_interactions_leaves_behaviour_unchanged() -> None:
    df = _two_worlds(seed=1)
    train, test = split_chronological(df)
    emb, present = item2vec(train, n_items=21)

    # Rewrite every test interaction (other users, other items incl. the never-trained
    # item 20, other ratings), keeping the timestamps so the cut stays where it is.
    rng = np.random.default_rng(7)
    changed = df.copy()
    k = len(test)
    changed.loc[test.index, "user_idx"] = rng.integers(0, 60, k)
    changed.loc[test.index, "item_idx"] = np.where(rng.random(k) < 0.5, 20, rng.integers(0, 20, k))
    changed.loc[test.index, "rating"] = rng.integers(1, 6, k).astype(np.float32)
    train2, test2 = split_chronological(changed)
    assert not test2.equals(test)
    pd.testing.assert_frame_equal(train2, train)
    emb2, present2 = item2vec(train2, n_items=21)
    np.testing.assert_array_equal(emb2, emb)
    np.testing.assert_array_equal(present2, present)
    assert not present2[20]  # only ever seen in test: cold, so no behaviour embedding

    # Sanity of the test itself: feeding test rows into training does change the embeddings.
    leaked, _ = item2vec(changed, n_items=21)
    assert not np.array_equal(leaked, emb)


def test_item2vec_cache_returns_identical_arrays(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = _two_worlds()
    a, pa = item2vec_cached(train, 20, tmp_path)
    assert len(list(tmp_path.glob("behaviour-*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr("data.behaviour.item2vec", fail)
    b, pb = item2vec_cached(train, 20, tmp_path)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pa, pb)
    with pytest.raises(AssertionError, match="cache miss"):  # other train data, other key
        item2vec_cached(train.iloc[:-1], 20, tmp_path)


def test_corrupt_cache_file_is_rebuilt(tmp_path) -> None:
    train = _two_worlds()
    good, _ = item2vec_cached(train, 20, tmp_path)
    (path,) = tmp_path.glob("behaviour-*.npy")
    path.write_bytes(b"not an npy file")
    again, _ = item2vec_cached(train, 20, tmp_path)
    np.testing.assert_array_equal(again, good)
    np.testing.assert_array_equal(np.load(path), good)  # and the cache is repaired


def _dense_item2vec(train: pd.DataFrame, n_items: int, cfg: Item2VecConfig) -> np.ndarray:
    """The method this module replaced, kept as the reference: dense N x N co-occurrence and
    PPMI, full symmetric eigendecomposition of M M^T (memory N^2, time N^3)."""
    order = np.argsort(train["user_idx"].to_numpy(), kind="stable")
    users, items = train["user_idx"].to_numpy()[order], train["item_idx"].to_numpy()[order]
    flat = np.zeros(n_items * n_items)
    for k in range(1, cfg.window + 1):
        same = users[k:] == users[:-k]
        flat += np.bincount(items[:-k][same] * n_items + items[k:][same], minlength=n_items * n_items) / k
    c = flat.reshape(n_items, n_items)
    c = c + c.T
    active = np.flatnonzero(c.sum(1) > 0)
    c = c[np.ix_(active, active)]
    total, row, col = c.sum(), c.sum(1), c.sum(0) ** cfg.smoothing
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(c / total) - np.log(row / total)[:, None] - np.log(col / col.sum())[None, :]
    m = np.maximum(np.where(np.isfinite(pmi), pmi, 0.0), 0.0)
    evals, evecs = np.linalg.eigh(m @ m.T)
    w = evecs[:, ::-1][:, : cfg.dim] * np.sqrt(np.sqrt(np.maximum(evals[::-1][: cfg.dim], 0.0)))
    out = np.zeros((n_items, cfg.dim))
    out[active] = w / np.linalg.norm(w, axis=1, keepdims=True)
    return out


def test_sparse_method_matches_the_dense_one() -> None:
    """Same neighbours as the dense method for the 30 most popular items; rows agree up to sign per dimension.

    400 items, dim 16: the sketch (16 + 128 columns) is smaller than the 400 x 400 matrix, so
    this exercises the randomized range finder, not an exact decomposition. Tolerance: the
    10 nearest neighbours (cosine) of each of the 30 most popular items are the same set, and
    every item's embedding has cosine >= 0.999 with the dense one.
    """
    rng = np.random.default_rng(3)
    n, n_items = 20_000, 400
    items = np.minimum(rng.zipf(1.2, n) - 1, n_items - 1)
    users = rng.integers(0, 300, n)
    items = np.where(rng.random(n) < 0.5, (items + users * 7) % n_items, items)  # some user structure
    train = prepare_interactions(users, items, np.ones(n), np.arange(n))
    cfg = Item2VecConfig(dim=16)
    sparse, present = item2vec(train, n_items, cfg)
    dense = _dense_item2vec(train, n_items, cfg)
    assert present.tolist() == (np.linalg.norm(dense, axis=1) > 0).tolist()
    signs = np.sign((sparse[present] * dense[present]).sum(axis=0))  # singular vectors are defined up to sign
    dense = dense * signs
    cos = (sparse[present] * dense[present]).sum(axis=1)
    assert cos.min() >= 0.999, cos.min()

    pop = np.bincount(train["item_idx"], minlength=n_items)
    for i in np.argsort(-pop, kind="stable")[:30]:
        a, b = sparse @ sparse[i], dense @ dense[i]
        a[i] = b[i] = -np.inf
        assert set(np.argsort(-a)[:10]) == set(np.argsort(-b)[:10]), i


def test_cooccurrence_is_sparse_and_linear_in_interactions() -> None:
    rng = np.random.default_rng(0)
    n = 50_000
    train = prepare_interactions(rng.integers(0, 2000, n), rng.integers(0, 100_000, n), np.ones(n), np.arange(n))
    c = cooccurrence(train, 100_000, window=5, distance_weighting=True)
    assert c.shape == (100_000, 100_000) and c.nnz <= 2 * 5 * n  # a dense matrix would be 80 GB
