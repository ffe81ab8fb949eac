"""Rank in-process (the embedded ONNX Runtime option) on a SQLite store, and the anchor-cache LRU.

Tolerance 1e-4 against PyTorch: see tests/export/test_hmat_export.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from features.actions import label_of
from features.store import ItemSids, OnlineStoreConfig, StreamAction, open_stream_store
from models.hmat.inference import rank_candidates
from models.hmat.sequence import UserSequence, build_stream
from serving.backends import OrtBackend
from serving.online import OnlineReader
from serving.profiles import Profiles
from serving.ranking import AnchorCacheStore, ItemStatus, Ranker, _CacheEntry, model_info
from serving.repository import publish_version


def test_in_process_onnx_runtime_ranker_matches_pytorch(tiny_export, tmp_path) -> None:
    publish_version(tmp_path / "repo", tiny_export.graphs)
    store = open_stream_store(OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "fs", stream_len=20, n_codes=6))
    rng = np.random.default_rng(0)
    codes = rng.integers(16, size=(30, 6))
    tokens = codes + np.arange(6) * 16
    store.put_item_sids([ItemSids(i, tuple(map(int, tokens[i])), "", 0) for i in range(30)])
    hist = [4, 9, 9, 17, 2, 28, 3]
    store.append_batch(
        [StreamAction(5, f"e{t}", i, 1 + t % 6, 100 + t, tuple(map(int, tokens[i]))) for t, i in enumerate(hist)]
    )
    cands = [11, 3, 25, 0, 19]
    seq = UserSequence(
        [1, 3],
        torch.from_numpy(codes[hist]),
        torch.tensor([int(label_of(1 + t % 6)) for t in range(len(hist))]),
        torch.from_numpy(codes[cands]),
    )
    want = rank_candidates(tiny_export.model, build_stream([seq], tiny_export.model.config.layout))[0].tolist()

    async def go():
        ranker = Ranker(
            OrtBackend(tmp_path / "repo"), OnlineReader(store), Profiles(None, (1, 3)), model_info(tmp_path / "repo")
        )
        miss = await ranker.rank(5, [*cands, 999])
        hit = await ranker.rank(5, cands[::-1])
        await ranker.backend.close()
        return miss, hit

    miss, hit = asyncio.run(go())
    got = {i.item_id: i.score for i in miss.items if i.status == ItemStatus.SCORED}
    np.testing.assert_allclose([got[c] for c in cands], want, atol=1e-4, rtol=0)
    assert miss.items[-1].item_id == 999 and miss.items[-1].status == ItemStatus.UNKNOWN_ITEM
    assert hit.cache_hit and {i.item_id: i.score for i in hit.items} == got
    assert miss.history_len == len(hist)


def test_anchor_cache_is_bounded_in_bytes_keyed_by_stream_version_and_dropped_per_model() -> None:
    def entry(version: str, n: int = 100) -> _CacheEntry:
        return _CacheEntry({"keys": np.zeros(n, np.uint8)}, version, n)

    cache = AnchorCacheStore(max_bytes=250)
    cache.put(1, (3, "a"), entry("v1"))
    cache.put(2, (1, "b"), entry("v1"))
    assert cache.get(1, (3, "a")) is not None and cache.get(1, (4, "c")) is None  # the stream moved on
    cache.put(3, (1, "c"), entry("v2"))  # over budget: the least recently used (user 2) goes
    assert cache.get(2, (1, "b")) is None and cache.get(1, (3, "a")) is not None and cache.nbytes == 200
    cache.drop_version("v1")
    assert len(cache) == 1 and cache.get(3, (1, "c")) is not None and cache.nbytes == 100
    cache.put(4, (1, "d"), entry("v2", 1000))  # larger than the whole budget: not kept
    assert cache.get(4, (1, "d")) is None and cache.nbytes == 100


def test_cold_user_without_profile_is_scored_on_the_full_path(tiny_export, tmp_path) -> None:
    """No profile tokens and no history: an empty stream, which the encode graph cannot take (no anchors)."""
    publish_version(tmp_path / "repo", tiny_export.graphs)
    store = open_stream_store(OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "fs", stream_len=20, n_codes=6))
    codes = np.random.default_rng(1).integers(16, size=(10, 6))
    store.put_item_sids([ItemSids(i, tuple(map(int, codes[i] + np.arange(6) * 16)), "", 0) for i in range(10)])
    cands = [7, 1, 4]
    seq = UserSequence(
        [], torch.zeros((0, 6), dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.from_numpy(codes[cands])
    )
    want = rank_candidates(tiny_export.model, build_stream([seq], tiny_export.model.config.layout))[0].tolist()

    async def go():
        ranker = Ranker(
            OrtBackend(tmp_path / "repo"), OnlineReader(store), Profiles.empty(), model_info(tmp_path / "repo")
        )
        try:
            return await ranker.rank(3, cands), len(ranker.cache)
        finally:
            await ranker.backend.close()

    result, cached = asyncio.run(go())
    got = {i.item_id: i.score for i in result.items}
    np.testing.assert_allclose([got[c] for c in cands], want, atol=1e-4, rtol=0)
    assert result.history_len == 0 and not result.cache_hit and cached == 0
