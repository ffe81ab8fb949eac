"""Item ingestion in this process: decode, frozen tokenizer, ID claim, write (``items_per_s``)."""

from __future__ import annotations

import time
from pathlib import Path


def bench_items(cfg, tokenizer_dir: Path, n: int = 2_000) -> float:
    """Items/s through ItemProcessor (decode, frozen tokenizer, store write), batches of 500."""
    import torch

    from features.store import open_stream_store
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.testing import synthetic_items
    from stream import records as rec
    from stream.processing import ItemProcessor

    torch.set_num_threads(1)  # as in the stream worker (stream.app)
    tok = FrozenTokenizer.load(tokenizer_dir)
    feats, _, _ = synthetic_items(n, tok.modalities, seed=1)
    msgs = [
        rec.RawMessage(
            "item-events",
            0,
            i,
            None,
            rec.item_event(50_000_000 + i, {m: feats[m][i] for m in tok.modalities}, 5).SerializeToString(),
        )
        for i in range(n)
    ]
    store = open_stream_store(cfg)
    proc = ItemProcessor(store, tok)
    t0 = time.perf_counter()
    for s in range(0, n, 500):
        proc.process(msgs[s : s + 500])
    rate = n / (time.perf_counter() - t0)
    store.close()
    return rate
