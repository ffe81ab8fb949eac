"""Behaviour modality: item2vec learned from the training interactions only.

Item2vec (Barkan & Koenigstein 2016) is skip-gram with negative sampling over users'
item sequences; SGNS implicitly factorises a shifted PMI matrix (Levy & Goldberg 2014),
so we compute that factorisation directly: windowed co-occurrence counts over each
user's chronological train sequence -> positive PMI with context-distribution smoothing
(alpha = 0.75, Levy, Goldberg & Dagan 2015) -> truncated SVD, W = U_d sqrt(S_d) (Levy et al.'s
symmetric weighting).
Closed form instead of SGD: deterministic (the SVD's random sketch has a fixed seed).

Memory linear in the interactions: the co-occurrence and PPMI matrices are sparse
(``scipy.sparse``; at most ``2 * window`` entries per training interaction), and the
truncated SVD is the randomized range finder of Halko, Martinsson & Tropp (2011, Alg. 4.4,
with subspace iterations): a few sparse-times-(N x l) products, l = dim + oversampling,
so the dense blocks are N x l, never N x N. On ML-100K it matches the exact SVD of the
dense matrix (tests/data/test_data_behaviour.py states the tolerance); measured on 100,000
items and 1,000,000 interactions by ``hisam bench data``.

Why train only: the ranker is evaluated on the test interactions; an item embedding
that saw them would leak which items co-occur in the future. The input is the ``train``
frame and nothing else, and items with no training interaction (cold items) get a zero
row with ``present = False``, exactly like an unseen item in production.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data.cache import atomic_save_npy, load_cached_npy

log = logging.getLogger(__name__)

# Part of the cache key: bump when the computation changes so old caches are not reused.
ALGORITHM_VERSION = "ppmi-sparse-rsvd/2"


@dataclass(frozen=True)
class Item2VecConfig:
    dim: int = 64
    window: int = 5  # neighbours on each side within a user's sequence
    smoothing: float = 0.75  # context distribution exponent (Levy et al. 2015)
    distance_weighting: bool = True  # weight a pair at distance k by 1/k, as word2vec's dynamic window does on average
    oversample: int = 128  # extra sketch columns of the randomized SVD (l = dim + oversample)
    power_iterations: int = 8  # subspace iterations: PPMI spectra decay slowly, so more than the usual 2
    seed: int = 0  # of the randomized SVD's Gaussian sketch


def cooccurrence(train: pd.DataFrame, n_items: int, window: int, distance_weighting: bool) -> sp.csr_matrix:
    """(N, N) sparse symmetric windowed co-occurrence counts of items within each user's train sequence.

    ``train`` is time-sorted (Dataset contract); a stable sort by user keeps each user's
    items in time order, so neighbours in the sorted arrays are neighbours in time. At most
    ``2 * window`` stored entries per interaction (repeated pairs are summed).
    """
    order = np.argsort(train["user_idx"].to_numpy(), kind="stable")
    users = train["user_idx"].to_numpy()[order]
    items = train["item_idx"].to_numpy()[order]
    c = sp.csr_matrix((n_items, n_items), dtype=np.float64)
    for k in range(1, window + 1):
        same = users[k:] == users[:-k]
        a, b = items[:-k][same], items[k:][same]
        w = 1.0 / k if distance_weighting else 1.0
        c = c + sp.coo_matrix((np.full(len(a), w), (a, b)), shape=(n_items, n_items)).tocsr()  # sums repeats
    return (c + c.T).tocsr()


def ppmi(counts: sp.spmatrix | np.ndarray, smoothing: float) -> sp.csr_matrix:
    """Positive PMI of a co-occurrence matrix with smoothed context probabilities (sparse in, sparse out).

    Only stored (non-zero) counts can have a positive PMI, so the result has at most the
    counts' entries.
    """
    counts = sp.csr_matrix(counts, dtype=np.float64)
    counts.eliminate_zeros()
    total = counts.sum()
    row = np.asarray(counts.sum(axis=1)).ravel()
    col = np.asarray(counts.sum(axis=0)).ravel() ** smoothing
    p_ctx = col / col.sum()
    coo = counts.tocoo()
    pmi = np.log(coo.data / total) - np.log(row[coo.row] / total) - np.log(p_ctx[coo.col])
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def randomized_svd(
    m: sp.spmatrix, k: int, oversample: int, power_iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` left singular vectors and values of ``m``: Halko et al. 2011, Alg. 4.4.

    A Gaussian sketch ``m @ omega`` (l = k + oversample columns) finds the range, refined by
    subspace iterations, each product renormalised by an LU factorisation (cheaper than QR
    and as stable here, as in scikit-learn); a final QR gives an orthonormal basis, and the
    small (l x cols) projection is decomposed exactly. Memory: ``m`` plus a few (rows x l)
    blocks. With l >= min(m.shape) the sketch spans everything and the result is exact.
    BLAS runs on one thread: the products are sparse (single-threaded anyway), and OpenBLAS
    threads spinning on a busy 2-core machine made the factorisations 5-10x slower (measured).
    """
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    def lu(y: np.ndarray) -> np.ndarray:
        return scipy.linalg.lu(y, permute_l=True, check_finite=False)[0]

    rows, cols = m.shape
    l = min(k + oversample, rows, cols)
    omega = np.random.default_rng(seed).standard_normal((cols, l))
    with threadpool_limits(1):
        q = m @ omega
        for _ in range(power_iterations):
            q = m @ lu(m.T @ lu(q))
        q, _ = np.linalg.qr(q)
        b = (m.T @ q).T  # (l, cols) = q^T m
        ub, s, _ = np.linalg.svd(b, full_matrices=False)
        return q @ ub[:, :k], s[:k]


def item2vec(
    train: pd.DataFrame, n_items: int, config: Item2VecConfig = Item2VecConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Behaviour embeddings from ``train``: ((N, dim) float32 unit-norm rows, (N,) bool present).

    An item is present if it co-occurs with at least one item in some user's window;
    that is every item with a training interaction unless its only users have a single
    training interaction each.
    """
    counts = cooccurrence(train, n_items, config.window, config.distance_weighting)
    active = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() > 0)
    emb = np.zeros((n_items, config.dim), dtype=np.float32)
    if len(active) >= 2:
        m = ppmi(counts[active][:, active], config.smoothing)
        del counts
        u, s = randomized_svd(m, config.dim, config.oversample, config.power_iterations, config.seed)
        d = len(s)
        w = u * np.sqrt(s)  # (A, d)
        # Singular vectors are defined up to sign; fix it (largest |entry| positive) so the
        # embedding does not flip between BLAS builds.
        flip = np.sign(w[np.abs(w).argmax(axis=0), np.arange(d)])
        w *= np.where(flip == 0, 1.0, flip)
        norms = np.linalg.norm(w, axis=1, keepdims=True)
        w = np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)
        emb[active, :d] = w.astype(np.float32)
    present = np.linalg.norm(emb, axis=1) > 0
    return emb, present


def item2vec_cached(
    train: pd.DataFrame, n_items: int, cache_dir: str | Path, config: Item2VecConfig = Item2VecConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`item2vec`, cached under a key hashing the train (user, item) sequence and the config."""
    h = hashlib.sha256()
    h.update(repr((ALGORITHM_VERSION, n_items, sorted(asdict(config).items()))).encode())
    h.update(np.ascontiguousarray(train["user_idx"].to_numpy(np.int64)).tobytes())
    h.update(np.ascontiguousarray(train["item_idx"].to_numpy(np.int64)).tobytes())
    path = Path(cache_dir) / f"behaviour-{h.hexdigest()[:24]}.npy"
    emb = load_cached_npy(path, (n_items, config.dim))
    if emb is not None:
        log.info("behaviour embeddings: cache hit %s", path.name)
        return emb, np.linalg.norm(emb, axis=1) > 0
    log.info("behaviour embeddings: item2vec (sparse PPMI, randomized SVD, dim %d) over %d train interactions",
             config.dim, len(train))  # fmt: skip
    emb, present = item2vec(train, n_items, config)
    atomic_save_npy(path, emb)
    return emb, present
