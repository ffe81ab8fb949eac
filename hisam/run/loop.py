"""The whole loop on one machine (``hisam run``): events in, features fresh, model learning, Rank serving.

Stages, each reused when its output is already there and still valid:

1. dataset: ML-100K (or a directory in the custom format) with its item modalities;
2. tokenizer: the frozen DST (``artifacts/tokenizers/dst``);
3. initial ranker: HMAT, PT then SFT on the training period (the chronological 90%), CPU
   preset, short history (``--max-items``), so it takes minutes on a laptop;
4. services: the Kafka-compatible broker, Redis when ``--backend redis``, Triton on a fresh
   model repository holding the initial ranker as version 1, then the stream worker, the
   Rank server and the near-line trainer as supervised processes (infra/supervisor.py);
5. backfill: every item and the training period's actions go through the stream, so every
   user has a history in the online store; the trainer's consumer group is then placed at
   the end of training-samples (those samples trained the initial ranker already);
6. replay: the test period's actions at ``--rate`` per second, as live traffic. Meanwhile a
   freshness probe times produce -> visible in the online store for one action in
   ``--probe-every``, a Rank client calls Rank about twice a second for users just seen,
   and a progress line every few seconds shows ingest, freshness, trainer and Rank;
7. drain and report: wait (bounded) for the stream and trainer to catch up, send sample
   Rank calls, write ``reports/run/report.md`` with a table and plots, and
   ``summary.json``; then stop everything in reverse order. Ctrl-C at any point stops the
   children cleanly and still writes what was measured.

The work directory (``runs/loop/<time>``) holds the run's online store, model repository,
trainer state and each process's log; trained artifacts live under ``--artifacts``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from hisam.run import stages
from hisam.run.probes import FreshnessProbe, RecentUsers
from hisam.run.state import LoopOptions, Run
from infra.kafka import Offsets
from serving.load import RankCaller

log = logging.getLogger(__name__)

QUIET_LOGGERS = ("kafka", "onnx_ir", "onnxscript", "torch.onnx")  # per-connection / per-pass INFO lines


def run_loop(opts: LoopOptions) -> Run:
    """Run every stage; returns the Run (also on Ctrl-C, with ``interrupted`` set)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(opts.work_dir or Path("runs/loop") / stamp)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(opts, work)
    try:
        _run_stages(run)
    except KeyboardInterrupt:
        run.interrupted = True
        log.warning("interrupted: everything was stopped; the report holds what was measured")
    except Exception as e:  # reported (with the child's log when a child died), then the exit status says so
        run.error = f"{type(e).__name__}: {e}"
        log.exception("the loop failed; everything was stopped")
    return run


def _run_stages(run: Run) -> None:
    import torch

    from features.store import open_stream_store
    from stream import producer as prod

    opts = run.opts
    torch.set_num_threads(max(1, opts.threads))
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with run.stage("dataset", 1):
        ds = stages.load_data(opts)
        run.facts["dataset"] = ds.summary()
    with run.stage("tokenizer", 2):
        tokenizer = stages.ensure_tokenizer(opts, ds)
    with run.stage("initial ranker", 3):
        checkpoint = stages.ensure_ranker(opts, tokenizer)
    run.facts["tokenizer"], run.facts["checkpoint"] = str(tokenizer), str(checkpoint)

    with contextlib.ExitStack() as stack:
        with run.stage("services", 4):
            services = stages.start_services(stack, run, tokenizer, checkpoint)
        producer = prod.make_producer(services.bootstrap)
        stack.callback(producer.close)
        offsets = Offsets(services.bootstrap, client_id="hisam-loop")
        stack.callback(offsets.close)
        with run.stage("backfill", 5):
            stages.backfill(run, services, producer, offsets, ds)
        address = stages.start_rank_and_trainer(run, services, checkpoint)

        store = open_stream_store(services.store)
        stack.callback(store.close)
        run.probe = FreshnessProbe(store, opts.probe_every).start()
        stack.callback(run.probe.stop)
        users = RecentUsers(ds.items.ids, opts.candidates, opts.seed)
        run.caller = RankCaller(address, users, opts.rank_interval_s).start()
        stack.callback(run.caller.close)

        test = ds.test.sort_values("timestamp", kind="stable")
        if opts.replay_limit:
            test = test.head(opts.replay_limit)
        with run.stage("replay", 6):
            stages.replay(run, services, producer, offsets, test, ds.name, users)
        with run.stage("drain", 7):
            stages.drain(run, services, offsets, test, ds.items.ids)
