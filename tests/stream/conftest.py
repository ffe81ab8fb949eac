"""Stream test fixtures: a really trained tiny tokenizer (helpers live in stream.testing), and
services a test owns and can stop and start again.

The session's broker and Redis (tests/conftest.py) are shared by many tests, so a test that
restarts a service gets its own: ``Restartable`` runs one of infra.services' context
managers on a fixed port and data directory, so clients reconnect to the same address and
find the data they left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.ports import free_port


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small but really trained DST tokenizer saved to disk (the stream loads it frozen)."""
    from models.device import torch_threads
    from recipes.tokenizer.testing import tiny_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    with torch_threads(1):  # k-means on a busy 2-core machine: extra threads only contend
        tiny_tokenizer(out, n_items=128, epochs=2)
    return out


class Restartable:
    """A service that can be stopped and started again at the same address with the same data."""

    def __init__(self, factory: Callable[..., contextlib.AbstractContextManager], data_dir: Path, **kw) -> None:
        self.factory, self.data_dir, self.kw = factory, data_dir, kw
        self.port = free_port()
        self._stack: contextlib.ExitStack | None = None
        self.handle = None

    def start(self):
        assert self._stack is None, "already running"
        self._stack = contextlib.ExitStack()
        self.handle = self._stack.enter_context(self.factory(port=self.port, data_dir=self.data_dir, **self.kw))
        return self.handle

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


@pytest.fixture
def own_broker(tmp_path):
    from infra.services import kafka_broker

    svc = Restartable(kafka_broker, tmp_path / "kafka")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture
def own_redis(tmp_path):
    from infra.services import redis_server

    svc = Restartable(redis_server, tmp_path / "redis", durable=True)
    svc.start()
    yield svc
    svc.stop()
