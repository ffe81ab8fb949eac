"""Shared fixtures: determinism first (docs/design.md: a seed fixture makes tests deterministic)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    """One torch thread: the test models are tiny, and on a 2-core machine shared with the
    broker, Redis and worker processes, intra-op threads mostly wait on each other (a tiny
    tokenizer trained in 1.5 s on one thread and 30-40 s on two under load)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed every RNG the project uses; returns the seed for tests that need it."""
    import torch

    s = 1234
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole test module (``pytest.mark.usefixtures("one_thread")``).

    The session runs on one thread already (``pytest_configure``); this restores it around a
    module that runs after something else changed it (a job's ``--threads``).
    """
    from models.device import torch_threads

    with torch_threads(1):
        yield


# --- Services (the real broker and a private Redis; see infra/services.py) -----------------
# Started once per session on free 127.0.0.1 ports with data in temporary directories.
# When scripts/services.sh already started them (HISAM_KAFKA_BOOTSTRAP / HISAM_REDIS_URL
# set), the tests use those instead. Never mocked, never skipped.


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap address of a running Kafka-compatible broker."""
    from infra.services import kafka_broker

    if os.environ.get("HISAM_KAFKA_BOOTSTRAP"):
        yield os.environ["HISAM_KAFKA_BOOTSTRAP"]
        return
    with kafka_broker() as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def redis_url() -> str:
    """redis:// URL of a private Redis (never the system one on 6379)."""
    from infra.services import redis_server

    if os.environ.get("HISAM_REDIS_URL"):
        yield os.environ["HISAM_REDIS_URL"]
        return
    with redis_server() as server:
        yield server.url


@pytest.fixture(scope="session")
def build_cache(request, tmp_path_factory):
    """``build_cache(name)``: a directory for expensive test artifacts (traced ONNX graphs).

    pytest's cache directory when its cache plugin is on (kept across runs, keyed by the
    callers on their sources), else a fresh session directory (``scripts/test.sh`` runs with
    ``-p no:cacheprovider``, as CI does: each run then builds once).
    """
    from pathlib import Path

    cache = getattr(request.config, "cache", None)

    def get(name: str) -> Path:
        return Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)

    return get
