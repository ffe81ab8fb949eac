"""Stream test fixtures: a really trained tiny tokenizer (helpers live in stream.testing)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small but really trained DST tokenizer saved to disk (the stream loads it frozen)."""
    import torch

    from models.tokenizer.testing import tiny_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    # One intra-op thread: on a busy 2-core machine torch's thread pool turns this
    # seconds-long training into tens of seconds (oversubscription in k-means).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_tokenizer(out, n_items=128, epochs=2)
    finally:
        torch.set_num_threads(threads)
    return out
