"""Publishing candidates to the Triton model repository, confirming Triton serves them, rolling back.

Publishing goes through ``serving.repository.publish_version`` (staged, then renamed into
place: Triton never sees a half-written version). Its configs use ``version_policy latest
1`` and Triton polls the repository (infra/triton.py), so:

- the newest complete version is the served one; a new version is loaded, then the old one
  is unloaded after its in-flight requests finish (no request fails during the swap);
- a rollback *hides* the newest version: its directories are renamed out of the repository
  (to ``<repo>.retired/<model>/<n>``, the same filesystem, so each move is one atomic
  rename), the previous version becomes the newest, and Triton loads it back. The three
  models of a version move one after the other; the Rank server already copes with
  encode_history and score_with_cache answering from different versions for a moment
  (serving/ranking.py falls back to the full path);
- retention keeps the newest K versions and never removes the served one or its parent
  (the rollback target).

``TritonWatch.wait_serving`` polls Triton's model readiness for the exact version number
of every model: the publish latency the trainer reports ends there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from serving.repository import GRAPH_MODELS, published_versions

log = logging.getLogger(__name__)


def retired_root(repo: str | Path) -> Path:
    repo = Path(repo).resolve()
    return repo.with_name(repo.name + ".retired")


def hide_version(repo: str | Path, version: int) -> list[Path]:
    """Move version ``version`` of every model out of ``repo`` (module docstring); returns where to."""
    repo = Path(repo)
    moved = []
    dest_root = retired_root(repo)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for model in GRAPH_MODELS.values():
        src = repo / model / str(version)
        if not src.exists():
            continue
        dest = dest_root / model / f"{version}-{stamp}-{os.getpid()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dest)
        moved.append(dest)
    log.info("hid version %d of %s (%d model dirs)", version, repo, len(moved))
    return moved


def rollback_to(repo: str | Path, target: int | None = None) -> tuple[int, list[int]]:
    """Hide every version newer than ``target`` (default: the one before the newest); returns (served, hidden)."""
    versions = sorted(published_versions(repo))
    if len(versions) < 2 and target is None:
        raise ValueError(f"{repo} has {len(versions)} version(s): nothing to roll back to")
    target = versions[-2] if target is None else target
    if target not in versions:
        raise ValueError(f"version {target} is not in {repo} (present: {versions})")
    newer = [v for v in versions if v > target]
    for v in reversed(newer):
        hide_version(repo, v)
    return target, newer


def retain(repo: str | Path, keep: int, protect: set[int]) -> list[int]:
    """Delete all but the newest ``keep`` versions, never one in ``protect``; returns the deleted versions."""
    repo = Path(repo)
    versions = sorted(published_versions(repo))
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in protect]
    for v in doomed:
        for moved in hide_version(repo, v):  # out of Triton's sight first, then delete
            shutil.rmtree(moved, ignore_errors=True)
    if doomed:
        log.info("retention: removed versions %s of %s (keeping %d)", doomed, repo, keep)
    return doomed


@dataclass
class TritonWatch:
    """Polls a Triton server (gRPC ``host:port``) until a version of every HMAT model is ready."""

    url: str
    poll_s: float = 0.1

    def serving(self, version: int) -> bool:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        try:
            return all(client.is_model_ready(m, str(version)) for m in GRAPH_MODELS.values())
        except Exception:  # noqa: BLE001 - not answering means not serving yet
            return False
        finally:
            client.close()

    def wait_serving(self, version: int, timeout_s: float) -> float:
        """Seconds until every model serves ``version``; raises TimeoutError."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.serving(version):
                return time.monotonic() - t0
            time.sleep(self.poll_s)
        raise TimeoutError(f"Triton at {self.url} did not serve version {version} within {timeout_s:.0f}s")
