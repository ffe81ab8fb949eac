"""The near-line trainer service: training-samples -> core.NearlineTrainer -> gated publish to Triton.

Consumption. A kafka-python ``KafkaConsumer`` with its own group id and auto-commit off,
*assigned* every partition of the topic: the trainer is a singleton (one model state), so
there is nothing for a group rebalance to share, and an assignment cannot be revoked
mid-batch. Micro-batches close at ``max_records`` samples or ``max_wait_s`` after their
first record, whichever comes first (bounded polls).

Durability (at-least-once in, exactly-once into the model). After each micro-batch:
process it (test, then train), run the probation / gate / publish step, write the
snapshot (candidate, optimizer, offsets per partition, windows, seen ids: state.py), and
only then commit the offsets to the group. On restart the snapshot's offsets are where
consumption resumes (the group's committed offsets are used only for partitions the
snapshot does not know), so a crash between the snapshot and the commit redelivers
nothing the model has trained on, and a crash before the snapshot retrains nothing twice:
the batch is replayed onto the state that never saw it. Event ids are deduplicated in a
bounded window besides (core.py), for redeliveries from upstream.

Rejected samples (undecodable, another tokenizer's codes, wrong shapes) are counted by
reason and written to the dead-letters topic with the reason (stream/records.py's
DeadLetter) before the offsets are committed: nothing is skipped silently.

Publishing (publish.py, export/template.py). When the gate passes (core.py: a paired test on
the prequential window): render the candidate's three ONNX graphs from the traced
template, check ONNX Runtime against PyTorch on real probe streams, save its weights under
the state's ``versions/<content version>`` and publish atomically into the Triton
repository (``Publisher.stage``, on the loop: well under a second). Then Triton loads the
version, which takes seconds (``Publisher.confirm``: wait until Triton serves it, apply
retention). By default that wait runs in a background thread and the loop keeps
consuming and training; the weights that were published are kept aside, because the
candidate trains on. While a publish is in flight the loop starts no other publish and
makes no probation verdict; at the first batch boundary after Triton serves the version,
the published weights become the serving model, the old one its parent, and the lineage
record is appended (parent version, offsets consumed, the gate's statistics, parity,
latency gate passed -> served, measured by the waiting thread when Triton answers, not
when the loop notices). Until then the old version is the serving model, as it is in
Triton (latest-1 policy: Triton swaps only after the new version loaded, so no Rank
call fails or sees a half-loaded version). A version Triton does not serve within
``publish_timeout_s`` is hidden again and recorded as a refusal (``not_served``).
``background_publish=False`` waits on the loop instead. A crash while a publish is in
flight leaves a complete but unrecorded version in the repository: on restart it is
adopted as serving, on probation (``_recover_unrecorded_publish``).

A failed check is a refusal with its reason in the lineage; the candidate keeps
training. While a version is on probation the parent is scored too, and a version that
underperforms it is hidden again (rollback). A rollback done from outside (``hisam
trainer rollback``) is noticed at the next batch.

Fault injection (tests): with ``HISAM_FAULT_CORRUPT_AFTER_PUBLISHES=N`` in its environment
the service corrupts its candidate right after its N-th publish, with
``HISAM_FAULT_CORRUPT=scramble`` (default: every weight tensor permuted and sign-flipped,
finite but wrong) or ``nan``; the gate must refuse what follows.

Tokenizer lifecycle (docs/method.md §1 "Lifecycle", App. A.4). The tokenizer is frozen: the
trainer only takes samples of the tokenizer version of its warm-start checkpoint. After a
new tokenizer is trained (monthly), ``hisam tokenizer migrate`` re-encodes the items and
rewrites every user stream into a new online-store namespace (stream/retokenize.py; the
stream workers restart on it with ``--project``), the ranker is re-trained offline on the
new codes (``hisam ranker pretrain`` weekly, then ``hisam ranker
finetune --init pretrain``), and a trainer is started from that checkpoint with a new
state directory. Until then, samples of the new version are dead-lettered here with
reason ``tokenizer_mismatch`` (and the old trainer refuses to resume a state of another
version), so old and new codes never mix in one model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from export.graphs import model_version
from export.template import ParityError, Template, check_parity, export_graphs, probe_sequences
from infra import observability as obs
from models.hmat.checkpoint import load_checkpoint, save_checkpoint
from models.hmat.model import HMAT
from serving.repository import publish_version, published_versions
from stream import topics as tp
from trainer.core import MODELS, GateDecision, NearlineTrainer, paired_summary, summary
from trainer.publish import TritonWatch, hide_version, retain
from trainer.samples import SampleRejected, decode_sample
from trainer.state import StateDir

log = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    bootstrap: str
    state_dir: Path
    repo: Path
    topic: str = tp.TRAINING_SAMPLES
    dead_letter_topic: str = tp.DEAD_LETTERS
    group_id: str = "hisam-trainer"
    max_records: int = 256  # micro-batch size
    max_wait_s: float = 2.0  # a micro-batch closes this long after its first record
    triton_url: str | None = None  # confirm that Triton serves each published version
    publish_timeout_s: float = 120.0
    template_dir: Path | None = None  # traced ONNX templates (default: <state_dir>/onnx_templates)
    full_export: bool = False  # trace every candidate instead of re-weighting the template
    target: str = "cpu"
    instances: int = 1
    threads: int = 1
    idle_exit_s: float | None = None  # stop after this long without records (tests, benchmarks)
    max_samples: int | None = None  # stop after this many samples (tests, benchmarks)
    background_publish: bool = True  # wait for Triton off the loop (module docstring)


class Publisher:
    """Export, check, publish, confirm, retain; writes weights and lineage into the state dir."""

    def __init__(self, cfg: ServiceConfig, state: StateDir, tokenizer_version: str, keep: int) -> None:
        self.cfg = cfg
        self.state = state
        self.tokenizer_version = tokenizer_version
        self.keep = keep
        self.watch = TritonWatch(cfg.triton_url) if cfg.triton_url else None
        self._template: Template | None = None

    def graphs(self, model: HMAT) -> dict:
        if self.cfg.full_export:
            return export_graphs(model, self.tokenizer_version)
        if self._template is None:
            self._template = Template.load_or_build(
                model.config, self.cfg.template_dir or self.state.root / "onnx_templates"
            )
        return self._template.render(model, self.tokenizer_version)

    def save_weights(self, model: HMAT, content: str, meta: dict) -> Path:
        out = self.state.versions / content
        if not (out / "model.safetensors").is_file():
            tmp = self.state.versions / f".tmp-{content}"
            save_checkpoint(tmp, model, tokenizer_version=self.tokenizer_version, meta=meta)
            tmp.rename(out)
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
        pv = publish_version(
            self.cfg.repo, graphs, target=self.cfg.target, instances=self.cfg.instances, threads=self.cfg.threads
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
        deleted = retain(self.cfg.repo, self.keep, protect | {version})
        out = {k: v for k, v in staged.items() if k not in ("t0", "model")}
        return out | {
            "served_s": served_s,
            "publish_latency_s": (t_served - staged["t0"]) if served_s is not None else None,
            "retention_deleted": deleted,
        }

    def publish(self, model: HMAT, probe, meta: dict, protect: set[int]) -> dict:
        """``stage`` then ``confirm`` on this thread (the bootstrap version)."""
        return self.confirm(self.stage(model, probe, meta), protect)


@dataclass
class InFlight:
    """A staged version Triton is loading while the loop trains on (module docstring)."""

    future: Future
    staged: dict
    decision: GateDecision
    parent: int | None
    offsets: dict
    trained: int  # samples trained when it was staged


class TrainerService:
    """The consume -> process -> gate -> snapshot -> commit loop (module docstring)."""

    def __init__(self, trainer: NearlineTrainer, cfg: ServiceConfig) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.state = StateDir(cfg.state_dir)
        self.publisher = Publisher(cfg, self.state, trainer.tokenizer_version, trainer.config.keep_versions)
        self._last_refusal: tuple[str, int] | None = None
        self._consumer = None
        self._producer = None
        self.reports: list[dict] = []  # one row per micro-batch (benchmarks read it)
        self.score_log: list | None = None  # set to [] to keep every prequential score (benchmarks)
        self.published = 0
        self.in_flight: InFlight | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._fault_after = int(os.environ.get("HISAM_FAULT_CORRUPT_AFTER_PUBLISHES", "0")) or None

    # --- start -------------------------------------------------------------------------------

    def restore_or_bootstrap(self) -> None:
        """Resume from the durable state, or adopt / publish the warm start as the first serving version."""
        loaded = self.state.load()
        if loaded is not None:
            snap, state, tensors = loaded
            content = {int(k): v for k, v in state["version_content"].items()}
            self.trainer.load_state(snap, state, tensors, lambda n: self.publisher.load_version(content[n]))
            log.info(
                "resumed from %s: %d samples trained, serving version %s, offsets %s",
                snap,
                self.trainer.trained,
                self.trainer.serving_version,
                self.trainer.offsets,
            )
            self._recover_unrecorded_publish()
            return
        t = self.trainer
        warm = copy.deepcopy(t.serving).cpu().eval()
        content = model_version(warm)
        versions = published_versions(self.cfg.repo)
        if versions:
            newest = max(versions)
            if versions[newest] != content:
                raise RuntimeError(
                    f"{self.cfg.repo} serves {versions[newest]} (version {newest}), not the warm-start checkpoint "
                    f"({content}): start the trainer from the serving checkpoint, or on an empty repository"
                )
            self.publisher.save_weights(warm, content, t.meta)
            record = {"event": "adopted", "version": newest, "model_version": content}
        else:
            record = {"event": "bootstrap", **self.publisher.publish(warm, [], t.meta, set())}
        t.serving_version = record["version"]
        t.version_content[record["version"]] = content
        self.state.append_lineage({**record, "parent": None, "offsets": {}})
        log.info("serving version %d (%s) at start", record["version"], content)
        self._snapshot()

    def _recover_unrecorded_publish(self) -> None:
        """A crash after a publish and before its snapshot: the repository's newest version is ours but unrecorded.

        Its weights were saved before the publish (``Publisher.publish``), so it is adopted
        as the serving version with the recorded one as its parent, on probation.
        """
        t = self.trainer
        versions = published_versions(self.cfg.repo)
        if not versions or max(versions) in t.version_content or t.serving_version not in versions:
            return
        newest, content = max(versions), versions[max(versions)]
        if not (self.state.versions / content).is_dir():
            return
        t.version_content[newest] = content
        t.on_published(newest, model=self.publisher.load_version(content))  # the candidate keeps its snapshot
        self.state.append_lineage(
            {"event": "recovered", "version": newest, "model_version": content, "parent": t.parent_version}
        )
        log.warning("version %d (%s) was published before a crash: serving it, on probation", newest, content)

    def _snapshot(self) -> None:
        state, tensors = self.trainer.state_dict()
        self.state.save(self.trainer.save_candidate, tensors, state)

    # --- Kafka -------------------------------------------------------------------------------

    def _connect(self) -> None:
        from infra.kafka import KafkaConsumer, KafkaProducer, TopicPartition

        c = KafkaConsumer(
            bootstrap_servers=self.cfg.bootstrap,
            group_id=self.cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.cfg.max_records,
        )
        deadline = time.monotonic() + 30
        parts = c.partitions_for_topic(self.cfg.topic)
        while not parts:
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.cfg.topic} does not exist on {self.cfg.bootstrap}")
            time.sleep(0.2)
            c.topics()  # refresh metadata
            parts = c.partitions_for_topic(self.cfg.topic)
        tps = [TopicPartition(self.cfg.topic, p) for p in sorted(parts)]
        c.assign(tps)
        for part in tps:
            key = f"{part.topic}:{part.partition}"
            if key in self.trainer.offsets:
                c.seek(part, self.trainer.offsets[key])  # the durable state wins
            else:
                committed = c.committed(part)
                if committed is not None:
                    c.seek(part, committed)
                else:
                    c.seek_to_beginning(part)
        self._consumer = c
        self._producer = KafkaProducer(bootstrap_servers=self.cfg.bootstrap, acks="all", linger_ms=5)
        log.info("consuming %s (%d partitions) as group %s", self.cfg.topic, len(tps), self.cfg.group_id)

    def _commit(self) -> None:
        from infra.kafka import OffsetAndMetadata, TopicPartition

        offsets = {}
        for key, off in self.trainer.offsets.items():
            topic, _, part = key.rpartition(":")
            offsets[TopicPartition(topic, int(part))] = OffsetAndMetadata(off, "", -1)
        if offsets:
            self._consumer.commit(offsets)

    def _poll_batch(self, stop: threading.Event) -> list:
        buf: list = []
        first = None
        idle_since = time.monotonic()
        while not stop.is_set():
            want = self.cfg.max_records - len(buf)
            got = self._consumer.poll(timeout_ms=100, max_records=want)
            for records in got.values():
                buf.extend(records)
            now = time.monotonic()
            if buf and first is None:
                first = now
            if len(buf) >= self.cfg.max_records or (first is not None and now - first >= self.cfg.max_wait_s):
                break
            if not buf and self.in_flight is not None and self.in_flight.future.done():
                break  # an idle stream: record the publish now (``run``), not at the next record
            if not buf and self.cfg.idle_exit_s is not None and now - idle_since > self.cfg.idle_exit_s:
                stop.set()
        return buf

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.restore_or_bootstrap()
        self._connect()
        try:
            while not stop.is_set():
                batch = self._poll_batch(stop)
                if batch:
                    self.handle(batch)
                elif self.in_flight is not None and self._finish_publish(block=False):
                    self._snapshot()  # an idle stream: record the served version now
                if self.cfg.max_samples is not None and self.trainer.trained >= self.cfg.max_samples:
                    break
            if self.in_flight is not None:  # a clean stop: finish the publish, so lineage and state agree
                self._finish_publish(block=True)
                self._snapshot()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._consumer.close()
            self._producer.close()

    def handle(self, records: list) -> None:
        """One micro-batch of Kafka records, end to end (module docstring)."""
        from stream.records import RawMessage, dead_letter

        t = self.trainer
        t0 = time.perf_counter()
        obs.TRAINER_SAMPLES_CONSUMED.inc(len(records))
        examples = []
        for r in records:
            try:
                examples.append(decode_sample(r.value, t.layout, t.tokenizer_version))
            except SampleRejected as e:
                t.counts[f"rejected_{e.reason}"] += 1
                obs.TRAINER_SAMPLES_REJECTED.labels(reason=e.reason).inc()
                log.warning("rejecting %s[%d]@%d: %s", r.topic, r.partition, r.offset, e)
                msg = RawMessage(r.topic, r.partition, r.offset, r.key, r.value)
                dl = dead_letter(msg, e.reason, e.detail, int(time.time() * 1000))
                self._producer.send(self.cfg.dead_letter_topic, key=r.key or b"", value=dl.SerializeToString())
        report = t.process(examples)
        obs.TRAINER_SAMPLES_TRAINED.inc(report.trained)
        obs.TRAINER_SAMPLE_DUPLICATES.inc(report.duplicates)
        for s in report.step_seconds:
            obs.TRAINER_STEP_LATENCY.observe(s)
        if self.score_log is not None and report.trained:
            self.score_log.append((report.users, report.labels, report.scores))
        for r in records:
            key = f"{r.topic}:{r.partition}"
            t.offsets[key] = max(t.offsets.get(key, 0), r.offset + 1)
        self.step()
        self._producer.flush()  # dead letters are durable before their offsets are committed
        self._snapshot()
        self._commit()
        dt = time.perf_counter() - t0
        m = t.metrics()
        obs.TRAINER_BATCH_LATENCY.observe(dt)
        for model, v in m.items():
            for gauge, key in ((obs.TRAINER_AUC, "auc"), (obs.TRAINER_GAUC, "gauc")):
                if isinstance(v, dict) and v.get(key) is not None and math.isfinite(v[key]):
                    gauge.labels(model=model).set(v[key])
        self._observe_lag()
        row = {
            "records": len(records),
            "trained": report.trained,
            "duplicates": report.duplicates,
            "rejected": len(records) - len(examples),
            "loss": report.loss,
            "seconds": dt,
            "train_seconds": report.seconds,
            "samples_per_s": report.trained / report.seconds if report.seconds else math.nan,
            "metrics": m,
            "serving_version": t.serving_version,
        }
        self.reports.append(row)
        log.info(
            "batch: %d records, %d trained (%.0f samples/s in the model, %.2fs end to end), loss %.4f; window: %s",
            len(records),
            report.trained,
            row["samples_per_s"] if report.trained else 0.0,
            dt,
            report.loss,
            summary(m),
        )

    def _observe_lag(self) -> None:
        """Consumer lag per partition: the end offset (the consumer's, from its last fetch
        response: no broker round trip) less the next offset to read."""
        if self._consumer is None:
            return
        from infra.kafka import TopicPartition

        for key, next_offset in self.trainer.offsets.items():
            topic, partition = key.rsplit(":", 1)
            end = self._consumer.highwater(TopicPartition(topic, int(partition)))
            if end is not None:
                obs.TRAINER_CONSUMER_LAG.labels(topic=topic, partition=partition).set(max(0, end - next_offset))

    def step(self) -> None:
        """Finish an in-flight publish, probation verdict, external rollbacks, then the gate and a publish."""
        t = self.trainer
        if self.in_flight is not None and not self._finish_publish(block=False):
            return  # Triton is still loading it: no verdict, no second publish (module docstring)
        offsets = dict(t.offsets)
        verdict = t.probation_verdict()
        if verdict is not None:
            if verdict.passed:
                self.state.append_lineage({"event": "kept", "version": t.serving_version, "metrics": verdict.metrics})
                t.end_probation()
            else:
                bad, parent = t.serving_version, t.parent_version
                obs.TRAINER_ROLLBACKS.labels(trigger="probation").inc()
                hide_version(self.cfg.repo, bad)
                t.on_rolled_back()
                self.state.append_lineage(
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
        self._follow_external_rollback()
        decision = t.gate()
        obs.TRAINER_GATE_DECISIONS.labels(outcome="passed" if decision.passed else decision.reason).inc()
        if decision.reason == "not_enough_samples":
            return
        if not decision.passed:
            self._refused(decision.reason, decision.metrics, offsets)
            if decision.reason == "non_finite_weights":
                t.reset_candidate(t.serving)  # NaN weights never recover by themselves
            return
        self._start_publish(decision, offsets)
        if self.in_flight is not None and (not self.cfg.background_publish or self.publisher.watch is None):
            self._finish_publish(block=True)  # nothing to wait for without a Triton to watch

    def _start_publish(self, decision: GateDecision, offsets: dict) -> None:
        """Stage the candidate (export, parity, write: on the loop), then wait for Triton in the background."""
        t = self.trainer
        parent = t.serving_version
        meta = {**t.meta, "parent_version": parent, "offsets": offsets}
        try:
            staged = self.publisher.stage(t.candidate, t.probe_sequences(), meta)
        except ParityError as e:
            obs.TRAINER_GATE_DECISIONS.labels(outcome="parity_failed").inc()
            self._refused("parity_failed", {"detail": str(e), **decision.metrics}, offsets)
            return
        if not staged["created"]:  # the candidate equals a version already there (it did not train)
            log.info(
                "candidate %s is already version %d: nothing to publish", staged["model_version"], staged["version"]
            )
            t.since_publish = 0
            return
        protect = {v for v in (parent, t.parent_version) if v is not None}
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        future = self._executor.submit(self.publisher.confirm, staged, protect)
        self.in_flight = InFlight(future, staged, decision, parent, offsets, t.trained)

    def _finish_publish(self, block: bool) -> bool:
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
            hide_version(self.cfg.repo, version)  # never let a version Triton could not load become the newest
            self._refused(
                "not_served", {"version": version, "detail": str(e), **flight.decision.metrics}, flight.offsets
            )
            return True
        t.version_content[version] = result["model_version"]
        t.on_published(version, model=flight.staged["model"])
        self.published += 1
        obs.TRAINER_PUBLISHES.inc()
        obs.TRAINER_PUBLISHED_VERSION.set(version)
        if result.get("publish_latency_s") is not None:
            obs.TRAINER_PUBLISH_LATENCY.observe(result["publish_latency_s"])
        self._last_refusal = None
        gate = flight.decision.metrics
        record = {"event": "published", "parent": flight.parent, "offsets": flight.offsets, "gate": gate, **result}
        record["trained_while_loading"] = t.trained - flight.trained  # the loop did not wait for Triton
        self.state.append_lineage(record)
        log.info(
            "published version %d (%s), parent %s: %s; gate %s; latency %s",
            version,
            result["model_version"],
            flight.parent,
            summary({k: v for k, v in gate.items() if k in MODELS}),
            paired_summary(gate["paired"]),
            f"{result['publish_latency_s']:.2f}s" if result["publish_latency_s"] is not None else "not confirmed",
        )
        if self.published == self._fault_after:
            self._corrupt(os.environ.get("HISAM_FAULT_CORRUPT", "scramble"))
        return True

    def _corrupt(self, how: str) -> None:
        """Fault injection (module docstring)."""
        import torch

        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.trainer.candidate.parameters():
                if how == "nan":
                    p.fill_(float("nan"))
                elif p.dim():
                    p.copy_(-p[torch.randperm(p.shape[0], generator=g)])
        log.warning("fault injection: candidate weights corrupted (%s)", how)

    def _refused(self, reason: str, metrics: dict, offsets: dict) -> None:
        t = self.trainer
        t.counts[f"refused_{reason}"] += 1
        last = self._last_refusal
        if last is None or last[0] != reason or t.trained - last[1] >= t.config.min_samples:
            self.state.append_lineage({"event": "refused", "reason": reason, "metrics": metrics, "offsets": offsets})
            stats = paired_summary(metrics["paired"]) if "paired" in metrics else ""
            log.warning("gate refused the candidate: %s; %s %s", reason, summary(metrics), stats)
            self._last_refusal = (reason, t.trained)

    def _follow_external_rollback(self) -> None:
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
        t.adopt_serving(self.publisher.load_version(content), newest)
        t.version_content[newest] = content
        obs.TRAINER_ROLLBACKS.labels(trigger="external").inc()
        self.state.append_lineage(
            {"event": "rollback", "auto": False, "version": withdrawn, "to": newest, "model_version": content}
        )
        log.warning("version %s was withdrawn from the repository: now serving %d", withdrawn, newest)
