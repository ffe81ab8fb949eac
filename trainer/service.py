"""The near-line trainer service: training-samples -> NearlineTrainer -> gated publish to Triton.

``TrainerService`` runs the loop around the parts: the consumer (consumer.py) brings a
micro-batch, the trainer (nearline.py) tests and trains on it, ``step`` makes the decisions
(finish a publish in flight, the probation verdict, following a rollback done from outside,
the gate, a new publish: publisher.py), then the state is snapshotted and the offsets
committed.

Durability (at-least-once in, exactly-once into the model). After each micro-batch:
process it (test, then train), run the probation / gate / publish step, write the
snapshot (candidate, optimizer, offsets per partition, windows, seen ids: lineage.py), and
only then commit the offsets to the group. On restart the snapshot's offsets are where
consumption resumes (the group's committed offsets are used only for partitions the
snapshot does not know), so a crash between the snapshot and the commit redelivers
nothing the model has trained on, and a crash before the snapshot retrains nothing twice:
the batch is replayed onto the state that never saw it. Event ids are deduplicated in a
bounded window besides (learner.py), for redeliveries from upstream.

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

import logging
import math
import threading
import time

from infra import observability as obs
from trainer.config import ServiceConfig
from trainer.consumer import SampleConsumer, advance
from trainer.deletions import DeletedUsers
from trainer.gate import summary
from trainer.learner import BatchReport
from trainer.lineage import StateDir
from trainer.nearline import NearlineTrainer
from trainer.publisher import Publisher

log = logging.getLogger(__name__)


class TrainerService:
    """The consume -> process -> step -> snapshot -> commit loop (module docstring)."""

    def __init__(self, trainer: NearlineTrainer, cfg: ServiceConfig) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.state = StateDir(cfg.state_dir)
        self.consumer = SampleConsumer(cfg)
        # Deleted users' pending samples are skipped (trainer/deletions.py).
        self.deletions = DeletedUsers(cfg.bootstrap, cfg.tombstone_topic) if cfg.tombstone_topic else None
        self.publisher = Publisher(cfg, self.state, trainer)
        self.reports: list[dict] = []  # one row per micro-batch (benchmarks read it)
        self.score_log: list | None = None  # set to [] to keep every prequential score (benchmarks)

    # --- start -------------------------------------------------------------------------------

    def restore_or_bootstrap(self) -> None:
        """Repair the repository, then resume from the durable state, or adopt / publish the warm start.

        The repair comes first (publisher.py's ``repair_at_start``): a rollback cut short is
        completed and a half publish undone before the trainer adopts anything, so the version
        it then serves is the repository's newest complete one, which is what Triton serves.
        """
        self.publisher.repair_at_start()
        loaded = self.state.load()
        if loaded is None:
            self.publisher.bootstrap()
            self._snapshot()
            return
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
        self.publisher.recover_unrecorded()
        self.publisher.follow_external_rollback()  # one done while the trainer was down
        self.publisher.show_serving()

    def _snapshot(self) -> None:
        state, tensors = self.trainer.state_dict()
        self.state.save(self.trainer.save_candidate, tensors, state)

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.restore_or_bootstrap()
        self.consumer.connect(self.trainer.offsets)
        publisher = self.publisher
        try:
            while not stop.is_set():
                batch = self.consumer.poll_batch(stop, wake=self._publish_done)
                if batch:
                    self.handle(batch)
                elif publisher.in_flight is not None and publisher.finish(block=False):
                    self._snapshot()  # an idle stream: record the served version now
                if self.cfg.max_samples is not None and self.trainer.trained >= self.cfg.max_samples:
                    break
            if publisher.in_flight is not None:  # a clean stop: finish the publish, so lineage and state agree
                publisher.finish(block=True)
                self._snapshot()
        finally:
            publisher.close()
            self.consumer.close()
            if self.deletions is not None:
                self.deletions.close()

    def _publish_done(self) -> bool:
        """Triton serves (or gave up on) the version in flight: an idle poll returns to record it now."""
        flight = self.publisher.in_flight
        return flight is not None and flight.future.done()

    def handle(self, records: list) -> None:
        """One micro-batch of Kafka records, end to end (module docstring)."""
        t = self.trainer
        t0 = time.perf_counter()
        kept = records if self.deletions is None else self.deletions.keep(records)
        t.counts["skipped_of_deleted_users"] += len(records) - len(kept)
        examples, rejected = self.consumer.decode(kept, t.learner.layout, t.tokenizer_version)
        for reason, n in rejected.items():
            t.counts[f"rejected_{reason}"] += n
        report = t.process(examples)
        self._observe_batch(report)
        advance(t.offsets, records)
        self.step()
        self.consumer.flush()  # dead letters are durable before their offsets are committed
        self._snapshot()
        self.consumer.commit(t.offsets)
        dt = time.perf_counter() - t0
        m = t.learner.window.metrics()
        obs.TRAINER_BATCH_LATENCY.observe(dt)
        for model, v in m.items():
            for gauge, key in ((obs.TRAINER_AUC, "auc"), (obs.TRAINER_GAUC, "gauc")):
                if isinstance(v, dict) and v.get(key) is not None and math.isfinite(v[key]):
                    gauge.labels(model=model).set(v[key])
        self.consumer.observe_lag(t.offsets)
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

    def _observe_batch(self, report: BatchReport) -> None:
        obs.TRAINER_SAMPLES_TRAINED.inc(report.trained)
        obs.TRAINER_SAMPLE_DUPLICATES.inc(report.duplicates)
        for s in report.step_seconds:
            obs.TRAINER_STEP_LATENCY.observe(s)
        if self.score_log is not None and report.trained:
            self.score_log.append((report.users, report.labels, report.scores))

    def step(self) -> None:
        """Finish an in-flight publish, probation verdict, external rollbacks, then the gate and a publish."""
        t, publisher = self.trainer, self.publisher
        if not publisher.finish(block=False):
            return  # Triton is still loading it: no verdict, no second publish (publisher.py)
        offsets = dict(t.offsets)
        verdict = t.probation_verdict()
        if verdict is not None and verdict.passed:
            self.state.append_lineage({"event": "kept", "version": t.serving_version, "metrics": verdict.metrics})
            t.end_probation()
        elif verdict is not None:
            publisher.roll_back(verdict, offsets)
        publisher.follow_external_rollback()
        decision = t.gate()
        obs.TRAINER_GATE_DECISIONS.labels(outcome="passed" if decision.passed else decision.reason).inc()
        if decision.reason == "not_enough_samples":
            return
        if not decision.passed:
            publisher.refused(decision.reason, decision.metrics, offsets)
            if decision.reason == "non_finite_weights":
                t.learner.reset_candidate(t.learner.serving)  # NaN weights never recover by themselves
            return
        publisher.start(decision, offsets)
