"""The Rank service as one process runs it (``hisam serve``): a ranker over a backend, the
online store and the served model's profile vocabulary, behind the gRPC server, until
SIGTERM or Ctrl-C.

The embedded Triton, when this process starts it, is restarted by this process if it
exits (infra/triton.py ``supervised_triton_server``); meanwhile Rank answers UNAVAILABLE
and health NOT_SERVING, and recovers with no restart of the server (serving/server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from features.store import OnlineStoreConfig
from infra.triton_access import TritonAccess
from serving.deletions import follow_tombstones
from serving.security import ServerSecurity

if TYPE_CHECKING:
    from features.profiles import ProfileVocab
    from serving.profiles import Profiles
    from serving.ranking import Ranker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model_repo: Path  # the Triton model repository (also what ORT reads in-process)
    store: OnlineStoreConfig  # the online store the stream worker writes
    inference: str = "triton"  # or "ort": the graphs in this process
    triton_url: str | None = None  # a running Triton; None with "triton": start the embedded one
    threads: int = 1  # ONNX Runtime intra-op threads (ort)
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    max_candidates: int = 1000
    cache_mb: float = 256.0  # anchor KV cache budget (0: always recompute)
    item_ttl_s: float = 60.0  # how long an item's semantic IDs stay cached
    unknown_ttl_s: float = 2.0  # how long "the store does not know this item" stays cached
    request_timeout_s: float = 30.0  # a Rank call without a deadline, and the cap of any deadline
    store_timeout_s: float = 2.0  # one read of the online store
    health_interval_s: float = 1.0  # between health probes of Triton and the store
    health_timeout_s: float = 1.0  # one health probe of each dependency
    max_message_bytes: int = 1 << 20  # the largest Rank request received (serving/server.py)
    max_concurrent_rpcs: int = 256  # calls served at once; beyond: RESOURCE_EXHAUSTED
    # TLS, mutual TLS, bearer tokens (serving/security.py); the default protects nothing
    security: ServerSecurity = field(default_factory=ServerSecurity)
    reflection: bool = False  # gRPC server reflection (grpcurl without the .proto)
    tombstones_bootstrap: str | None = None  # the broker of user-tombstones (serving/deletions.py); None: off
    # Keys and TLS of the Triton hop (infra/triton_access.py): the client side, and the embedded
    # Triton's admin key (its client key is triton_access.key_file)
    triton_access: TritonAccess = field(default_factory=TritonAccess)
    triton_admin_key_file: Path | None = None


def checkpoint_profile_vocab(checkpoint: Path) -> ProfileVocab | None:
    """The profile vocabulary a ranker checkpoint was trained with; None for one without profiles."""
    from features.profiles import ProfileVocab
    from models.hmat.checkpoint import read_checkpoint_config

    cfg = read_checkpoint_config(checkpoint)
    return ProfileVocab.from_dict(cfg["profile_vocab"]) if "profile_vocab" in cfg else None


def make_ranker(config: ServeConfig, triton_url: str | None, profiles: Profiles) -> Ranker:
    """The Ranker for this configuration; call it on the serving event loop."""
    from features.store import open_stream_store
    from serving.backends import OrtBackend, TritonBackend
    from serving.online import OnlineReader, store_config_for_reads
    from serving.ranking import Ranker, model_info

    if config.inference == "triton":
        backend = TritonBackend(triton_url, config.triton_access)
    else:
        backend = OrtBackend(config.model_repo, config.threads)
    reader = OnlineReader(
        open_stream_store(store_config_for_reads(config.store, config.store_timeout_s)),
        item_ttl_s=config.item_ttl_s,
        unknown_ttl_s=config.unknown_ttl_s,
        read_timeout_s=config.store_timeout_s,
    )
    return Ranker(
        backend,
        reader,
        profiles,
        model_info(config.model_repo),
        max_candidates=config.max_candidates,
        cache_bytes=int(config.cache_mb * (1 << 20)),
        default_timeout_s=config.request_timeout_s,
    )


async def serve(
    config: ServeConfig, triton_url: str | None, profiles: Profiles, on_listening: Callable[[str], None]
) -> None:
    """Serve Rank until SIGTERM or SIGINT, then drain the calls in flight."""
    from serving.server import rank_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ranker = make_ranker(config, triton_url, profiles)
    tombstones = follow_tombstones(config.tombstones_bootstrap, ranker, loop)  # deleted users' anchor caches
    try:
        async with rank_server(
            ranker,
            config.host,
            config.port,
            health_interval_s=config.health_interval_s,
            health_timeout_s=config.health_timeout_s,
            max_receive_bytes=config.max_message_bytes,
            max_concurrent_rpcs=config.max_concurrent_rpcs,
            security=config.security,
            reflection=config.reflection,
        ) as handle:
            on_listening(handle.address)
            await stop.wait()
            log.info("shutting down: draining in-flight calls")
    finally:
        if tombstones is not None:
            tombstones.stop()
        await ranker.backend.close()
        ranker.reader.close()


def run_rank_service(config: ServeConfig, profiles: Profiles, on_listening: Callable[[str], None]) -> None:
    """``serve`` on the configured Triton, or on an embedded one started (and supervised) here."""
    with contextlib.ExitStack() as stack:
        url = config.triton_url
        if config.inference == "triton" and url is None:
            from infra.triton import supervised_triton_server

            if config.triton_access.tls_ca is not None:
                raise ValueError("the embedded Triton listens on 127.0.0.1 without TLS: give --triton-url for TLS")
            access = TritonAccess(key_file=config.triton_access.key_file, admin_key_file=config.triton_admin_key_file)
            url = stack.enter_context(supervised_triton_server(config.model_repo, access=access)).url
        asyncio.run(serve(config, url, profiles, on_listening))
