"""Where the online store lives, the stream contract it keeps, and Feast's view of it.

Feast's feature_store.yaml is written from the config (not committed) because the paths
and the Redis address are only known at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from features import encoding as enc

if TYPE_CHECKING:  # feast is imported only by the functions that need it
    from feast import FeatureStore

# Redis: ids per bucket of the seen window, on average (an append rewrites one bucket).
SEEN_BUCKET_IDS = 32

Backend = Literal["sqlite", "redis"]


@dataclass(frozen=True)
class OnlineStoreConfig:
    """Where the online store lives and the stream contract it keeps.

    ``repo_dir`` receives the generated feature_store.yaml and Feast's registry; the SQLite
    database defaults to ``repo_dir/online.db``.
    """

    backend: Backend = "sqlite"
    repo_dir: Path = Path("artifacts/feature_repo")
    redis_url: str | None = None
    sqlite_path: Path | None = None
    project: str = enc.DEFAULT_PROJECT
    stream_len: int = 300  # T: items kept per user (the paper's 300)
    n_codes: int = 6  # semantic-ID tokens per item
    # W: appended event ids remembered per user for idempotency (the package doc,
    # features/store/__init__.py); at least 2 x the stream worker's batch size.
    seen_window: int = 1024
    # Redis Cluster: batch appends become one script call per action (keys of one call
    # must share a hash slot). Reads and the layout are the same.
    redis_cluster: bool = False
    # Redis client timeouts, in seconds: a reply slower than ``redis_socket_timeout_s``, or
    # a connection not open within ``redis_connect_timeout_s``, raises redis'
    # TimeoutError rather than hang; the client does not retry it (a dropped connection is
    # retried once, at once): the callers do (the stream worker with backoff, serving on
    # the next request). The Rank server bounds its reads more tightly on its own.
    redis_socket_timeout_s: float = 5.0
    redis_connect_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if self.backend not in ("sqlite", "redis"):
            raise ValueError(f"backend must be 'sqlite' or 'redis', got {self.backend!r}")
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend 'redis' needs redis_url (redis://host:port/db)")
        if self.stream_len < 1 or self.n_codes < 1 or self.seen_window < 1:
            raise ValueError(
                f"stream_len, n_codes and seen_window must be >= 1, got {self.stream_len}, {self.n_codes}, {self.seen_window}"
            )
        if not (self.redis_socket_timeout_s > 0 and self.redis_connect_timeout_s > 0):
            raise ValueError(
                f"redis_socket_timeout_s and redis_connect_timeout_s must be > 0, got "
                f"{self.redis_socket_timeout_s}, {self.redis_connect_timeout_s}"
            )
        if not self.project.isidentifier():
            raise ValueError(f"project must be an identifier (it names tables), got {self.project!r}")

    @property
    def seen_buckets(self) -> int:
        """Redis: the seen window's buckets (about ``SEEN_BUCKET_IDS`` ids each; features/store/redis.py)."""
        return -(-self.seen_window // SEEN_BUCKET_IDS)

    @property
    def sqlite_db(self) -> Path:
        return Path(self.sqlite_path) if self.sqlite_path else Path(self.repo_dir) / "online.db"

    def feast_online_store(self) -> dict:
        """The ``online_store`` block of feature_store.yaml."""
        if self.backend == "sqlite":
            return {"type": "sqlite", "path": str(self.sqlite_db.resolve())}
        u = urlparse(self.redis_url)
        db = (u.path or "/0").lstrip("/") or "0"
        conn = f"{u.hostname or '127.0.0.1'}:{u.port or 6379},db={db}"
        if u.password:
            conn += f",password={u.password}"
        return {"type": "redis", "connection_string": conn}


def write_feature_store_yaml(config: OnlineStoreConfig) -> Path:
    """Write ``repo_dir/feature_store.yaml`` for the configured backend; returns its path."""
    import json

    repo = Path(config.repo_dir).resolve()
    repo.mkdir(parents=True, exist_ok=True)
    doc = {
        "project": config.project,
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(repo / "registry.db"), "cache_ttl_seconds": 0},
        "online_store": config.feast_online_store(),
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": enc.ENTITY_KEY_SERIALIZATION_VERSION,
    }
    path = repo / "feature_store.yaml"
    # JSON is a subset of YAML: no yaml dependency, and no quoting surprises in paths.
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def open_feature_store(config: OnlineStoreConfig, apply: bool = True) -> FeatureStore:
    """A Feast ``FeatureStore`` over the configured backend, with the definitions applied.

    Imports feast (~5 s): call it from jobs and tests, never from a light import chain.
    """
    import warnings

    from feast import FeatureStore

    from features import definitions

    write_feature_store_yaml(config)
    store = FeatureStore(repo_path=str(Path(config.repo_dir).resolve()))
    if apply:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.apply(definitions.ALL_OBJECTS)
    return store
