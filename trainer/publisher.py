"""Publishing the candidate to Triton, confirming Triton serves it, and withdrawing versions.

When the gate passes (gate.py), ``Publisher.start`` stages the candidate on the loop (well
under a second): it renders the candidate's three ONNX graphs from the traced template
(export/template.py), checks ONNX Runtime against PyTorch on real probe streams, saves its
weights under the state's ``versions/<content version>`` and publishes atomically into the
Triton repository (``serving.repository.publish_version``: staged, then renamed into place;
Triton never sees a half-written version). Then Triton loads the version, which takes
seconds (``confirm``: wait until Triton serves it, apply retention). By default that wait
runs in a background thread and the loop keeps consuming and training; the weights that
were published are kept aside, because the candidate trains on. While a publish is in
flight the loop starts no other publish and makes no probation verdict; at the first batch
boundary after Triton serves the version (``finish``), the published weights become the
serving model, the old one its parent, and the lineage record is appended (parent version,
offsets consumed, the gate's statistics, parity, latency gate passed -> served, measured by
the waiting thread when Triton answers, not when the loop notices). Until then the old
version is the serving model, as it is in Triton. A version Triton does not serve within
``publish_timeout_s`` is hidden again and recorded as a refusal (``not_served``).
``background_publish=False`` waits on the loop instead. A crash while a publish is in flight
leaves a complete but unrecorded version in the repository: on restart it is adopted as
serving, on probation (``recover_unrecorded``). A failed check is a refusal with its reason
in the lineage; the candidate keeps training.

The repository's configs use ``version_policy latest 1`` and Triton polls the repository
(infra/triton.py), so:

- the newest complete version is the served one; a new version is loaded, then the old one
  is unloaded after its in-flight requests finish (no request fails during the swap);
- a rollback *hides* the newest version: its directories are renamed out of the repository
  (to ``<repo>.retired/<model>/<n>``, the same filesystem, so each move is one atomic
  rename), the previous version becomes the newest, and Triton loads it back. The three
  models of a version move one after the other; the Rank server already copes with
  encode_history and score_with_cache answering from different versions for a moment
  (serving/ranking.py falls back to the full path). The trainer rolls back a version that
  fails probation (``roll_back``); ``hisam trainer rollback`` does it from outside
  (``rollback_to``), and the trainer follows at its next batch (``follow_external_rollback``);
- retention keeps the newest K versions and never removes the served one or its parent
  (the rollback target).

Crash safety: every step below is one durable rename or one fsynced append, in this order,
and every state between two steps is repaired at the next start (``repair_at_start``, run
before the trainer adopts or publishes anything; serving/repository.py's "Crash safety"
gives the repository's part). Publish: (1) the weights under ``versions/<content>``
(fsynced, renamed); (2) the three renames into the repository, ranking last; (3) Triton
serves it; (4) the lineage record; (5) the snapshot, then the offsets' commit. Cut in (2),
the repair undoes the half publish; after (2) and before (5), the restart adopts the
complete version on probation (``recover_unrecorded``; with a Triton to watch, only once
Triton serves it, else it is withdrawn as ``not_served``). Rollback: (1) the intent and the
three moves out of the repository, ranking first, under the repository's lock; (2) the
trainer serves the parent; (3) the lineage record; (4) the snapshot. Cut in (1), the repair
completes the moves (a rollback that started is never reverted); after (1) and before (4),
the restart finds its serving version withdrawn and serves the repository's newest
(``follow_external_rollback``). The repository's writer lock (``repository_lock``, with a
timeout) serialises the trainer's publishes and retention with ``hisam trainer rollback``:
a publish that finds it held is refused (``repository_locked``) and retried by the gate; a
rollback or a withdrawal that finds it held is retried at the next batch.

``TritonWatch.wait_serving`` polls Triton's model readiness for the exact version number of
every model, each call bounded (a Triton that accepts and never answers fails the wait at
``publish_timeout_s``, and the version is withdrawn; the trainer goes on): the publish
latency the trainer reports ends there. Every change of the serving version (the warm start
at start-up, a publish Triton serves, a recovery, a rollback either way) is a lineage record
(lineage.py) and sets the ``hisam_trainer_published_version`` gauge.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from export.graphs import model_version
from export.template import ParityError, Template, check_parity, export_graphs, probe_sequences
from infra import observability as obs
from infra.triton import models_ready, wait_models_ready
from infra.triton_access import OPEN, TritonAccess
from models.hmat.checkpoint import load_checkpoint, save_checkpoint
from models.hmat.model import HMAT
from serving.repository import (
    GRAPH_MODELS,
    LOCK_TIMEOUT_S,
    RepositoryLocked,
    durable_rename,
    hide_versions,
    publish_version,
    published_versions,
    repair,
    repository_lock,
)
from trainer.config import ServiceConfig
from trainer.faults import corrupt
from trainer.gate import GateDecision, paired_summary, summary
from trainer.learner import MODELS
from trainer.lineage import StateDir
from trainer.nearline import NearlineTrainer

log = logging.getLogger(__name__)

# --- the repository: hide, roll back, retain (serving/repository.py holds the lock and the steps) ---


def hide_version(
    repo: str | Path, version: int, *, fault_point: str | None = None, lock_timeout_s: float = LOCK_TIMEOUT_S
) -> list[Path]:
    """Move version ``version`` of every model out of ``repo`` (module docstring); returns where to."""
    return hide_versions(repo, [version], fault_point=fault_point, lock_timeout_s=lock_timeout_s)  # type: ignore[arg-type]


def rollback_to(
    repo: str | Path,
    target: int | None = None,
    *,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    fault_point: str | None = None,
) -> tuple[int, list[int]]:
    """Hide every version newer than ``target`` (default: the one before the newest); returns (served, hidden).

    Under the repository's writer lock (raises ``RepositoryLocked`` after ``lock_timeout_s``),
    after repairing what an interrupted publish or rollback left; the versions are hidden
    newest first, under one intent (serving/repository.py, "Crash safety").
    """
    with repository_lock(repo, lock_timeout_s):
        repair(repo)
        versions = sorted(published_versions(repo))
        if len(versions) < 2 and target is None:
            raise ValueError(f"{repo} has {len(versions)} version(s): nothing to roll back to")
        target = versions[-2] if target is None else target
        if target not in versions:
            raise ValueError(f"version {target} is not in {repo} (present: {versions})")
        newer = [v for v in versions if v > target]
        hide_versions(repo, list(reversed(newer)), fault_point=fault_point)  # type: ignore[arg-type]
    return target, newer


def retain(repo: str | Path, keep: int, protect: set[int], lock_timeout_s: float = LOCK_TIMEOUT_S) -> list[int]:
    """Delete all but the newest ``keep`` versions, never one in ``protect``; returns the deleted versions."""
    with repository_lock(repo, lock_timeout_s):
        versions = sorted(published_versions(repo))
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in protect]
        if doomed:
            for moved in hide_versions(repo, doomed):  # out of Triton's sight first, then delete
                shutil.rmtree(moved, ignore_errors=True)
            log.info("retention: removed versions %s of %s (keeping %d)", doomed, repo, keep)
    return doomed


@dataclass
class TritonWatch:
    """Polls a Triton server (gRPC ``host:port``) until a version of every HMAT model is ready; every call bounded."""

    url: str
    poll_s: float = 0.1
    call_timeout_s: float = 2.0
    access: TritonAccess = OPEN  # the client key and TLS of the Triton hop (infra/triton_access.py)

    def serving(self, version: int) -> bool:
        return models_ready(self.url, list(GRAPH_MODELS.values()), version, self.call_timeout_s, self.access)[0]

    def wait_serving(self, version: int, timeout_s: float) -> float:
        """Seconds until every model serves ``version``; raises TimeoutError (also when Triton hangs)."""
        models = list(GRAPH_MODELS.values())
        return wait_models_ready(self.url, models, version, timeout_s, self.poll_s, self.call_timeout_s, self.access)


# --- the trainer's publisher ---------------------------------------------------------------------


@dataclass
class InFlight:
    """A staged version Triton is loading while the loop trains on (module docstring)."""

    future: Future
    staged: dict
    decision: GateDecision
    parent: int | None
    offsets: dict
    trained: int  # samples trained when it was staged


class Publisher:
    """Export, check, publish, confirm, retain and withdraw the trainer's versions; records each in the lineage."""

    def __init__(self, cfg: ServiceConfig, state: StateDir, trainer: NearlineTrainer) -> None:
        self.cfg = cfg
        self.state = state
        self.trainer = trainer
        self.watch = TritonWatch(cfg.triton_url, access=cfg.triton_access) if cfg.triton_url else None
        self.in_flight: InFlight | None = None
        self.published = 0  # versions published by the gate in this process
        self._template: Template | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_refusal: tuple[str, int] | None = None

    # --- export, check, stage, confirm -------------------------------------------------------

    def graphs(self, model: HMAT) -> dict:
        if self.cfg.full_export:
            return export_graphs(model, self.trainer.tokenizer_version)
        if self._template is None:
            self._template = Template.load_or_build(
                model.config, self.cfg.template_dir or self.state.root / "onnx_templates"
            )
        return self._template.render(model, self.trainer.tokenizer_version)

    def save_weights(self, model: HMAT, content: str, meta: dict) -> Path:
        out = self.state.versions / content
        if not (out / "model.safetensors").is_file():
            tmp = self.state.versions / f".tmp-{content}"
            shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftovers
            save_checkpoint(tmp, model, tokenizer_version=self.trainer.tokenizer_version, meta=meta)
            shutil.rmtree(out, ignore_errors=True)  # a directory without weights: a crash's leftovers
            durable_rename(tmp, out)  # fsynced first: a version is never published before its weights are on disk
        return out

    def load_version(self, content: str) -> HMAT:
        return load_checkpoint(self.state.versions / content)[0]

    def stage(self, model: HMAT, probe, meta: dict) -> dict:
        """Export + parity + save weights + publish into the repository; raises ParityError (refusal).

        The result holds the timings so far and ``model`` (the exact weights published, CPU fp32);
        ``confirm`` completes it.
        """
        t0 = time.monotonic()
        model = copy.deepcopy(model).cpu().float().eval()
        graphs = self.graphs(model)
        t_export = time.monotonic()
        parity = check_parity(graphs, model, probe or probe_sequences(model.config))
        t_parity = time.monotonic()
        content = model_version(model)
        self.save_weights(model, content, meta)
        self.cfg.faults.exit_at("weights_saved")
        pv = publish_version(
            self.cfg.repo,
            graphs,
            target=self.cfg.target,  # type: ignore[arg-type]
            instances=self.cfg.instances,
            threads=self.cfg.threads,
            fault_point=self.cfg.faults.exit_in_publish,  # type: ignore[arg-type]
            lock_timeout_s=self.cfg.lock_timeout_s,
        )
        t_written = time.monotonic()
        return {
            "version": pv.version,
            "model_version": pv.model_version,
            "created": pv.created,
            "parity_max_abs": parity,
            "export_s": t_export - t0,
            "parity_s": t_parity - t_export,
            "write_s": t_written - t_parity,
            "t0": t0,
            "model": model,
        }

    def confirm(self, staged: dict, protect: set[int]) -> dict:
        """Wait until Triton serves the staged version (if watching), apply retention; raises TimeoutError.

        Safe in a background thread: it touches only Triton and the repository's older versions.
        """
        version = staged["version"]
        served_s = self.watch.wait_serving(version, self.cfg.publish_timeout_s) if self.watch else None
        t_served = time.monotonic()
        try:
            deleted = retain(
                self.cfg.repo, self.trainer.config.keep_versions, protect | {version}, self.cfg.lock_timeout_s
            )
        except RepositoryLocked as e:  # retention waits for the next publish; the version serves all the same
            log.warning("retention skipped: %s", e)
            deleted = []
        out = {k: v for k, v in staged.items() if k not in ("t0", "model")}
        return out | {
            "served_s": served_s,
            "publish_latency_s": (t_served - staged["t0"]) if served_s is not None else None,
            "retention_deleted": deleted,
        }

    # --- the serving version -----------------------------------------------------------------

    def show_serving(self) -> None:
        """Set the gauge to the version that serves (at start-up and after every change)."""
        if self.trainer.serving_version is not None:
            obs.TRAINER_PUBLISHED_VERSION.set(self.trainer.serving_version)

    def _serving_changed(self, record: dict) -> None:
        self.state.append_lineage(record)
        self.show_serving()

    def bootstrap(self) -> None:
        """A first start: adopt the warm start where the repository serves it, else publish it as the first version."""
        t = self.trainer
        warm = copy.deepcopy(t.learner.serving).cpu().eval()
        content = model_version(warm)
        versions = published_versions(self.cfg.repo)
        if versions:
            newest = max(versions)
            if versions[newest] != content:
                raise RuntimeError(
                    f"{self.cfg.repo} serves {versions[newest]} (version {newest}), not the warm-start checkpoint "
                    f"({content}): start the trainer from the serving checkpoint, or on an empty repository"
                )
            self.save_weights(warm, content, t.meta)
            record = {"event": "adopted", "version": newest, "model_version": content}
        else:
            record = {"event": "bootstrap", **self.confirm(self.stage(warm, [], t.meta), set())}
        t.serving_version = record["version"]
        t.version_content[record["version"]] = content
        self._serving_changed({**record, "parent": None, "offsets": {}})
        log.info("serving version %d (%s) at start", record["version"], content)

    def repair_at_start(self) -> None:
        """Before anything is adopted or published: finish an interrupted rollback, undo a half publish.

        serving/repository.py's ``repair`` (module docstring there, "Crash safety"); after it
        the repository holds only complete versions and its newest is what Triton serves.
        """
        repair(self.cfg.repo)

    def recover_unrecorded(self) -> None:
        """A crash after a publish and before its snapshot: the repository's newest version is ours but unrecorded.

        Its weights were saved before the publish (``stage``), so it is adopted as the
        serving version with the recorded one as its parent, on probation. With a Triton to
        watch, only once Triton serves it (within ``publish_timeout_s``): a version Triton
        does not serve is withdrawn and refused (``not_served``), as a publish would be.
        """
        t = self.trainer
        versions = published_versions(self.cfg.repo)
        if not versions or max(versions) in t.version_content or t.serving_version not in versions:
            return
        newest, content = max(versions), versions[max(versions)]
        if not (self.state.versions / content).is_dir():
            return
        if self.watch is not None:
            try:
                self.watch.wait_serving(newest, self.cfg.publish_timeout_s)
            except TimeoutError as e:
                log.error("version %d (%s), published before a crash, is not served: %s", newest, content, e)
                self._withdraw(newest, {"detail": str(e), "model_version": content}, dict(t.offsets))
                return
        t.version_content[newest] = content
        t.on_published(newest, model=self.load_version(content))  # the candidate keeps its snapshot
        self._serving_changed(
            {"event": "recovered", "version": newest, "model_version": content, "parent": t.parent_version}
        )
        log.warning("version %d (%s) was published before a crash: serving it, on probation", newest, content)

    def start(self, decision: GateDecision, offsets: dict) -> None:
        """Stage the candidate (export, parity, write: on the loop), then wait for Triton in the background."""
        t = self.trainer
        parent = t.serving_version
        meta = {**t.meta, "parent_version": parent, "offsets": offsets}
        try:
            staged = self.stage(t.learner.candidate, t.learner.probe_sequences(), meta)
        except ParityError as e:
            obs.TRAINER_GATE_DECISIONS.labels(outcome="parity_failed").inc()
            self.refused("parity_failed", {"detail": str(e), **decision.metrics}, offsets)
            return
        except RepositoryLocked as e:  # a rollback from outside holds the repository: the gate asks again
            self.refused("repository_locked", {"detail": str(e), **decision.metrics}, offsets)
            return
        if not staged["created"]:  # the candidate equals a version already there (it did not train)
            log.info(
                "candidate %s is already version %d: nothing to publish", staged["model_version"], staged["version"]
            )
            t.learner.since_publish = 0
            return
        protect = {v for v in (parent, t.parent_version) if v is not None}
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        future = self._executor.submit(self.confirm, staged, protect)
        self.in_flight = InFlight(future, staged, decision, parent, offsets, t.trained)
        if not self.cfg.background_publish or self.watch is None:
            self.finish(block=True)  # nothing to wait for without a Triton to watch

    def finish(self, block: bool) -> bool:
        """Record the in-flight publish once Triton serves it (or withdraw it); False while it is still loading."""
        flight = self.in_flight
        if flight is None:
            return True
        if not block and not flight.future.done():
            return False
        self.in_flight = None
        t = self.trainer
        version = flight.staged["version"]
        try:
            result = flight.future.result()
        except TimeoutError as e:
            log.error("publish of version %d failed: %s", version, e)
            if not self._withdraw(version, flight.decision.metrics | {"detail": str(e)}, flight.offsets):
                self.in_flight = flight  # the repository is locked: withdraw it at the next batch
                return False
            return True
        t.version_content[version] = result["model_version"]
        t.on_published(version, model=flight.staged["model"])
        self.published += 1
        obs.TRAINER_PUBLISHES.inc()
        if result.get("publish_latency_s") is not None:
            obs.TRAINER_PUBLISH_LATENCY.observe(result["publish_latency_s"])
        self._last_refusal = None
        gate = flight.decision.metrics
        record = {"event": "published", "parent": flight.parent, "offsets": flight.offsets, "gate": gate, **result}
        record["trained_while_loading"] = t.trained - flight.trained  # the loop did not wait for Triton
        self._serving_changed(record)
        log.info(
            "published version %d (%s), parent %s: %s; gate %s; latency %s",
            version,
            result["model_version"],
            flight.parent,
            summary({k: v for k, v in gate.items() if k in MODELS}),
            paired_summary(gate["paired"]),
            f"{result['publish_latency_s']:.2f}s" if result["publish_latency_s"] is not None else "not confirmed",
        )
        if self.published == self.cfg.faults.corrupt_after_publishes:
            corrupt(t.learner.candidate, self.cfg.faults.corrupt)
        return True

    def _withdraw(self, version: int, metrics: dict, offsets: dict) -> bool:
        """Hide a version Triton did not serve (never let it become the newest) and refuse it; False: locked."""
        try:
            hide_version(
                self.cfg.repo,
                version,
                fault_point=self.cfg.faults.exit_in_publish,
                lock_timeout_s=self.cfg.lock_timeout_s,
            )
        except RepositoryLocked as e:
            log.warning("cannot withdraw version %d yet: %s", version, e)
            return False
        self.refused("not_served", {"version": version, **metrics}, offsets)
        return True

    def roll_back(self, verdict: GateDecision, offsets: dict) -> None:
        """The version on probation underperforms its parent (gate.py): withdraw it, serve the parent again.

        The repository first (serving/repository.py's ``hide_versions``: a crash in it is
        completed at start-up), then the trainer's state and the lineage record; a crash
        before the snapshot is seen at start-up as a withdrawal (``follow_external_rollback``).
        """
        t = self.trainer
        bad, parent = t.serving_version, t.parent_version
        try:
            hide_version(
                self.cfg.repo, bad, fault_point=self.cfg.faults.exit_in_publish, lock_timeout_s=self.cfg.lock_timeout_s
            )
        except RepositoryLocked as e:  # the verdict stands: the next batch asks again
            log.warning("rollback of version %s deferred: %s", bad, e)
            return
        obs.TRAINER_ROLLBACKS.labels(trigger="probation").inc()
        t.on_rolled_back()
        self._serving_changed(
            {
                "event": "rollback",
                "auto": True,
                "version": bad,
                "to": parent,
                "reason": verdict.reason,
                "metrics": verdict.metrics,
                "offsets": offsets,
            }
        )
        log.warning(
            "rolled back version %s to %s: %s; %s",
            bad,
            parent,
            verdict.reason,
            paired_summary(verdict.metrics["paired"]),
        )

    def follow_external_rollback(self) -> None:
        """Serve what the repository serves when the serving version was withdrawn from outside."""
        t = self.trainer
        versions = published_versions(self.cfg.repo)
        if t.serving_version in versions or not versions:
            return
        newest = max(versions)
        content = versions[newest]
        if not (self.state.versions / content).is_dir():
            log.error("the repository now serves version %d (%s), whose weights this trainer lacks", newest, content)
            return
        withdrawn = t.serving_version
        t.adopt_serving(self.load_version(content), newest)
        t.version_content[newest] = content
        obs.TRAINER_ROLLBACKS.labels(trigger="external").inc()
        self._serving_changed(
            {"event": "rollback", "auto": False, "version": withdrawn, "to": newest, "model_version": content}
        )
        log.warning("version %s was withdrawn from the repository: now serving %d", withdrawn, newest)

    def refused(self, reason: str, metrics: dict, offsets: dict) -> None:
        """A candidate not published: counted always, recorded once per reason and ``min_samples`` trained."""
        t = self.trainer
        t.counts[f"refused_{reason}"] += 1
        last = self._last_refusal
        if last is None or last[0] != reason or t.trained - last[1] >= t.config.min_samples:
            self.state.append_lineage({"event": "refused", "reason": reason, "metrics": metrics, "offsets": offsets})
            stats = paired_summary(metrics["paired"]) if "paired" in metrics else ""
            log.warning("gate refused the candidate: %s; %s %s", reason, summary(metrics), stats)
            self._last_refusal = (reason, t.trained)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
