"""Before anything is written: where the namespaces live, and whether a migration from one to the other may run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from features.store import OnlineStoreConfig
from stream import records as rec

if TYPE_CHECKING:
    from models.tokenizer import FrozenTokenizer

# Why an event's tokens could not be mapped (stable strings: the report keys on them).
UNKNOWN_SID = "unknown_sid"
ITEM_NOT_IN_SOURCE = "item_not_in_source"
AMBIGUOUS_SID = "ambiguous_sid"
# Why an item of the item source was not encoded.
TOKENIZER_INPUT = rec.TOKENIZER_INPUT


class MigrationError(ValueError):
    """Bad input to a migration (namespaces, tokenizer, item source): nothing was written."""


# ---- namespaces ------------------------------------------------------------------------


def namespace_of(config: OnlineStoreConfig) -> str:
    """Where a namespace lives, as one comparable string (backend, location, project)."""
    if config.backend == "sqlite":
        return f"sqlite:{config.sqlite_db.resolve()}#{config.project}"
    u = urlparse(config.redis_url)
    db = (u.path or "/0").lstrip("/") or "0"
    return f"redis://{u.hostname or '127.0.0.1'}:{u.port or 6379}/{db}#{config.project}"


def default_project(tokenizer_version: str) -> str:
    """The target project for a tokenizer version: ``hisam_dst_0123abcd4567`` (an identifier)."""
    name = "hisam_" + "".join(c if c.isalnum() else "_" for c in tokenizer_version)
    if not name.isidentifier():
        raise MigrationError(f"tokenizer version {tokenizer_version!r} gives no valid project name")
    return name


def check_namespaces(source: OnlineStoreConfig, target: OnlineStoreConfig, tokenizer: FrozenTokenizer) -> None:
    """Refuse a migration that would write in place, lose events or mix code lengths."""
    if namespace_of(source) == namespace_of(target):
        raise MigrationError(
            f"source and target are the same namespace ({namespace_of(source)}): a migration never writes "
            "in place; give the target another project (--to-project) or store"
        )
    if Path(source.repo_dir).resolve() == Path(target.repo_dir).resolve():
        raise MigrationError(
            f"source and target share the feature repo {source.repo_dir}: its feature_store.yaml names one "
            "project, so the target needs its own (--to-repo-dir)"
        )
    if target.n_codes != tokenizer.n_codes:
        raise MigrationError(
            f"the new tokenizer {tokenizer.version} emits {tokenizer.n_codes} codes per item, "
            f"the target store is configured for {target.n_codes}"
        )
    if target.stream_len < source.stream_len or target.seen_window < source.seen_window:
        raise MigrationError(
            f"the target keeps T={target.stream_len}, W={target.seen_window}, less than the source's "
            f"T={source.stream_len}, W={source.seen_window}: events or seen ids would be lost"
        )
