"""Where the online store lives, the stream contract it keeps, and Feast's view of it.

Feast's feature_store.yaml is written from the config (not committed) because the paths
and the Redis address are only known at run time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from features import encoding as enc

if TYPE_CHECKING:  # feast is imported only by the functions that need it
    from feast import FeatureStore

# The environment variable Feast's feature_store.yaml names for the Redis password (Feast
# expands ``${VAR}`` in the file when it loads it): the password is never written to disk.
FEAST_PASSWORD_ENV = "HISAM_FEAST_REDIS_PASSWORD"

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
    # Optional TTL of a user's whole state (stream, profile, seen window), from its last append;
    # 0: kept until deleted (features/store/ttl.py).
    stream_ttl_s: float = 0.0
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
    # Redis ACL and TLS (docs/operations.md "Security: Redis"). The username and password
    # may come in the URL; ``redis_username`` and ``redis_password_file`` override it. The
    # file is read for each new connection, so a rotated password needs no restart.
    # ``rediss://`` turns TLS on; ``redis_tls_ca`` verifies the server against a private CA,
    # ``redis_tls_cert``/``redis_tls_key`` are a client certificate (tls-auth-clients).
    redis_username: str | None = None
    redis_password_file: Path | None = None
    redis_tls_ca: Path | None = None
    redis_tls_cert: Path | None = None
    redis_tls_key: Path | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("sqlite", "redis"):
            raise ValueError(f"backend must be 'sqlite' or 'redis', got {self.backend!r}")
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend 'redis' needs redis_url (redis://host:port/db)")
        if self.stream_len < 1 or self.n_codes < 1 or self.seen_window < 1:
            raise ValueError(
                f"stream_len, n_codes and seen_window must be >= 1, got {self.stream_len}, {self.n_codes}, {self.seen_window}"
            )
        if not self.stream_ttl_s >= 0:
            raise ValueError(f"stream_ttl_s must be >= 0 (0: no TTL), got {self.stream_ttl_s}")
        if not (self.redis_socket_timeout_s > 0 and self.redis_connect_timeout_s > 0):
            raise ValueError(
                f"redis_socket_timeout_s and redis_connect_timeout_s must be > 0, got "
                f"{self.redis_socket_timeout_s}, {self.redis_connect_timeout_s}"
            )
        tls_files = (self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)
        if any(tls_files) and not self.redis_tls:
            raise ValueError("redis_tls_ca/redis_tls_cert/redis_tls_key need a rediss:// redis_url (TLS)")
        if (self.redis_tls_cert is None) != (self.redis_tls_key is None):
            raise ValueError("redis_tls_cert and redis_tls_key go together (a client certificate and its key)")
        if not self.project.isidentifier():
            raise ValueError(f"project must be an identifier (it names tables), got {self.project!r}")

    @property
    def redis_tls(self) -> bool:
        """Whether the Redis URL asks for TLS (``rediss://``)."""
        return bool(self.redis_url) and urlparse(self.redis_url).scheme == "rediss"

    @property
    def redis_address(self) -> str:
        """``host:port`` of the Redis server, for messages (never the password)."""
        u = urlparse(self.redis_url or "")
        return f"{u.hostname or '127.0.0.1'}:{u.port or 6379}"

    @property
    def redis_url_bare(self) -> str:
        """The Redis URL without its username and password (those go through ``redis_password``)."""
        u = urlparse(self.redis_url or "")
        netloc = u.netloc.rpartition("@")[2]
        return u._replace(netloc=netloc).geturl()

    @property
    def redis_user(self) -> str:
        """The ACL user the clients log in as (``default`` when none is given)."""
        return self.redis_username or urlparse(self.redis_url or "").username or "default"

    def redis_password(self) -> str | None:
        """The password: read from ``redis_password_file`` now (trailing newline dropped), else the URL's."""
        if self.redis_password_file is not None:
            return Path(self.redis_password_file).read_text().rstrip("\r\n")
        from urllib.parse import unquote

        pw = urlparse(self.redis_url or "").password
        return None if pw is None else unquote(pw)

    def redis_tls_kwargs(self) -> dict:
        """redis-py's TLS keyword arguments for the configured files (empty without TLS)."""
        if not self.redis_tls:
            return {}
        kw: dict = {"ssl_cert_reqs": "required"}
        if self.redis_tls_ca is not None:
            kw["ssl_ca_certs"] = str(Path(self.redis_tls_ca).resolve())
        if self.redis_tls_cert is not None:
            kw["ssl_certfile"] = str(Path(self.redis_tls_cert).resolve())
            kw["ssl_keyfile"] = str(Path(self.redis_tls_key).resolve())
        return kw

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
        # Feast splits connection_string on "," and "=", json-decodes each value and hands
        # the pairs to redis.Redis(**kwargs) (feast/infra/online_stores/redis.py).
        parts = [self.redis_address, f"db={db}"]
        if self.redis_tls:
            parts.append("ssl=true")
            parts += [f"{k}={v}" for k, v in self.redis_tls_kwargs().items()]
        if self.redis_username or u.username:
            parts.append(f"username={self.redis_user}")
        if self.redis_password_file is not None or u.password:
            parts.append(f"password=${{{FEAST_PASSWORD_ENV}}}")
        for part in parts[1:]:
            _check_feast_value(part)
        return {"type": "redis", "connection_string": ",".join(parts)}


def _check_feast_value(part: str, what: str | None = None) -> None:
    """Refuse a connection_string value Feast would read as something else."""
    key, _, value = part.partition("=")
    what = what or key
    if value.startswith("${"):
        return
    bad = set(value) & set(',"\\') or any(ord(c) < 32 for c in value)
    decodes = False
    if key not in ("ssl", "db", "ssl_cert_reqs"):
        try:
            json.loads(value)
            decodes = True
        except ValueError:
            pass
    if bad or decodes:
        raise ValueError(
            f"Feast's Redis connection_string cannot carry this {what} (it splits on ',' and json-decodes "
            f"values; no ',', '\"', '\\\\' or JSON literals such as numbers); choose another or use the direct store"
        )


def write_feature_store_yaml(config: OnlineStoreConfig) -> Path:
    """Write ``repo_dir/feature_store.yaml`` for the configured backend; returns its path."""
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
    # JSON is a subset of YAML: no yaml dependency, and no quoting surprises in paths. The
    # password is only a ${VAR} reference; the file is still private (0600) to the owner.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    return path


def open_feature_store(config: OnlineStoreConfig, apply: bool = True) -> FeatureStore:
    """A Feast ``FeatureStore`` over the configured backend, with the definitions applied.

    Imports feast (~5 s): call it from jobs and tests, never from a light import chain.
    """
    import warnings

    from feast import FeatureStore

    from features import definitions

    write_feature_store_yaml(config)
    if config.backend == "redis":
        pw = config.redis_password()
        if pw is not None:
            _check_feast_value(f"password={pw}", "password")
            # Feast expands ${HISAM_FEAST_REDIS_PASSWORD} in the yaml when it loads it.
            os.environ[FEAST_PASSWORD_ENV] = pw
    store = FeatureStore(repo_path=str(Path(config.repo_dir).resolve()))
    if apply:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.apply(definitions.ALL_OBJECTS)
    return store
