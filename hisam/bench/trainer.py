"""``hisam bench trainer``: the near-line trainer on a replay of ML-100K's later events.

Setup: a ranker checkpoint is the warm start; the events after the last one it trained on
are replayed in time order as TrainingSamples (the stream's sample format, with the user's
history up to, not including, the event: the samples the stream worker would emit; ``hisam
bench stream`` measures that worker). The replay starts at the checkpoint's ``train_rows``
(``hisam ranker finetune --train-until F`` trains on the first fraction F of the timeline
only; a checkpoint of the whole train split replays the test split), so no replayed event
was seen by the warm start. A model frozen early and a long replay are what show the
near-line gain honestly: ML-100K's users arrive over time (after a cut at 60% of the log,
86% of the later events are by users the warm start never saw), and the positive rate
drifts (0.56 -> 0.50 -> 0.56 over the last four tenths).

By default the replay goes through a fresh broker and the trainer service consumes it
with Kafka, snapshots, commits, gates and publishes exactly as ``hisam trainer run`` does
(``--triton``: into a real Triton, timing each publish). ``--direct`` calls the trainer
core on the replay in process instead (no broker, no gate, no publish): the quick
figure of the model side, and how the near-line learning rate is chosen without looking
at the reported period: on a warm start frozen earlier, replaying only the events up to
where the reported replay begins (e.g. ``--train-until 0.5``, ``--limit 10000``, to choose
for ``--train-until 0.6`` and its replay).

Figures (a table, then one JSON object as the last line):

* ``prequential``: AUC / GAUC over the whole replay of the near-line candidate, of the
  version Triton served at each moment, and of the same model frozen at the warm start,
  every event scored before any model trained on it; D = AUC(near-line) - AUC(frozen) on
  the same events with a user-level paired bootstrap (trainer/paired.py); the same
  per chronological segment of ``--segment-size`` events, with the share of events by
  users the warm start never saw;
* ``samples_per_s``: the model work of a micro-batch (the prequential scorings + SFT
  steps) and end to end (decode, Kafka, gate, snapshot fsyncs, commit), on this device;
* ``publish``: for each published version, gate passed -> Triton serving it (ready for
  the exact version number; Rank reports the version Triton answered with, so its next call
  is scored by it), split into export, parity, write and Triton load (``--triton``), and
  the gate's paired statistics; refusals by reason;
* ``loadavg_1m`` before and after, and the thread count: the machine is shared, so compare
  runs only at similar load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data import default_data_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="warm-start ranker checkpoint")
    parser.add_argument("--tokenizer", type=Path, default=Path("artifacts/tokenizers/dst"))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument(
        "--replay-from", type=int, default=None, help="first replayed row (default: the checkpoint's train_rows)"
    )
    parser.add_argument("--limit", type=int, default=0, help="replay at most this many events (0: to the end)")
    parser.add_argument("--direct", action="store_true", help="trainer core in process: no broker, gate or publish")
    parser.add_argument("--max-records", type=int, default=256, help="micro-batch size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lr", type=float, default=3e-4, help="AdamW learning rate (trainer/learner.py: how it was chosen)"
    )
    parser.add_argument("--ema", type=float, default=0.98, help="candidate = EMA of the trained weights (decay/step)")
    parser.add_argument("--window", type=int, default=4000)
    parser.add_argument("--min-samples", type=int, default=1000)
    parser.add_argument("--gate-window", type=int, default=2000)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--min-improvement", type=float, default=0.0)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--gate-method", default="bootstrap", choices=("bootstrap", "delong"))
    parser.add_argument("--segment-size", type=int, default=2000, help="events per segment of the AUC trend")
    parser.add_argument("--triton", action="store_true", help="publish into a real Triton and time it")
    parser.add_argument("--foreground-publish", action="store_true", help="wait for Triton on the training loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep state, repository, templates here")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")


class Replay(NamedTuple):
    """The benchmark's replay: the events after the warm start's rows, as the stream would sample them."""

    examples: list  # Examples in time order
    known: set  # users the warm start saw
    profiles: object
    tokenizer_version: str
    codebook_size: int
    start: int  # first replayed row
    trained_rows: int  # rows the warm start trained on (the train split for checkpoints without train_rows)


def replay_examples(args: argparse.Namespace, max_items: int) -> Replay:
    """The events from the checkpoint's ``train_rows`` (or ``--replay-from``) on, as Examples."""
    from data import load_dataset
    from features.profiles import ProfileVocab
    from models.hmat.checkpoint import read_checkpoint_config
    from recipes.ranker import load_inputs
    from trainer.samples import Example

    ckpt = read_checkpoint_config(args.checkpoint)
    vocab = ProfileVocab.from_dict(ckpt["profile_vocab"])
    ds = load_dataset(args.dataset, args.data_dir, progress=False)
    inputs = load_inputs(ds, ckpt.get("variant", "hmat"), args.tokenizer, vocab)
    if inputs.tokenizer_version != ckpt.get("tokenizer_version"):
        raise SystemExit(
            f"{args.checkpoint} was trained on tokenizer {ckpt.get('tokenizer_version')}, not {inputs.tokenizer_version}"
        )
    trained_rows = int(ckpt.get("train_rows", len(ds.train)))  # checkpoints before --train-until: the train split
    start = trained_rows if args.replay_from is None else args.replay_from
    if start < trained_rows:
        raise SystemExit(f"--replay-from {start}: the warm start trained on rows < {trained_rows} (not prequential)")
    inter = ds.interactions
    users, items, labels = (inter[c].to_numpy() for c in ("user_idx", "item_idx", "label"))
    end = len(inter) if not args.limit else min(len(inter), start + args.limit)
    history: dict[int, list[int]] = {}
    examples = []
    for row in range(end):  # log order = time order (the split's order)
        u = int(users[row])
        past = history.setdefault(u, [])
        if row >= start:
            window = past[-max_items:]
            examples.append(
                Example(
                    user_id=u,
                    event_id=f"{ds.name}-{row}",
                    event_time_ms=row,
                    item_id=int(items[row]),
                    history_codes=inputs.item_codes[items[window]].reshape(-1, inputs.item_codes.shape[1]),
                    history_actions=labels[window].astype(np.int64),
                    target_codes=inputs.item_codes[items[row]],
                    label=int(labels[row]),
                )
            )
        past.append(row)
    known = set(users[:trained_rows].tolist())
    return Replay(examples, known, inputs.profiles, inputs.tokenizer_version, inputs.codebook_size, start, trained_rows)


def prequential_figures(log_rows, segment_size: int, known_users: set[int]) -> dict:
    """Whole-replay and per-segment AUC / GAUC per model, and the paired near-line - frozen difference."""
    from trainer.paired import paired_bootstrap
    from trainer.prequential import metrics_of

    users = np.concatenate([u for u, _, _ in log_rows])
    labels = np.concatenate([y for _, y, _ in log_rows])
    models = [m for m in ("frozen", "candidate", "serving") if m in log_rows[0][2]]
    scores = {m: np.concatenate([s[m] for _, _, s in log_rows]) for m in models}
    new_user = ~np.isin(users, np.fromiter(known_users, np.int64, len(known_users)))

    def block(a: int, b: int) -> dict:
        u, y = users[a:b], labels[a:b]
        out: dict = {"rows": [a, b], "users": len(np.unique(u)), "new_user_share": float(new_user[a:b].mean())}
        out |= {m: metrics_of(u, y, s[a:b]) for m, s in scores.items()}
        out["d_auc"] = paired_bootstrap(y, scores["candidate"][a:b], scores["frozen"][a:b], u, seed=0).to_dict()
        out["d_gauc"] = out["candidate"]["gauc"] - out["frozen"]["gauc"]
        return out

    bounds = list(range(0, len(labels), segment_size)) + [len(labels)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < segment_size // 2:  # fold a short tail into the last segment
        bounds.pop(-2)
    return {"whole_replay": block(0, len(labels)), "segments": [block(a, b) for a, b in itertools.pairwise(bounds)]}


def table(results: dict) -> str:
    """The human-readable part of the output: the AUC trend, throughput and publishes."""
    pq = results["prequential"]
    head = (
        f"{'events':>13} {'users':>5} {'new':>5} | {'frozen AUC':>10} {'near-line':>9} {'D AUC [lower, upper]':>26}"
        f" | {'frozen GAUC':>11} {'near-line':>9} {'D GAUC':>7}"
    )
    lines = [head, "-" * len(head)]
    for seg in [*pq["segments"], pq["whole_replay"]]:
        d = seg["d_auc"]
        span = "whole replay" if seg is pq["whole_replay"] else f"{seg['rows'][0]}-{seg['rows'][1]}"
        lines.append(
            f"{span:>13} {seg['users']:>5} {seg['new_user_share']:>5.0%} | {seg['frozen']['auc']:>10.4f}"
            f" {seg['candidate']['auc']:>9.4f} {d['diff']:>+8.4f} [{d['lower']:+.4f}, {d['upper']:+.4f}]"
            f" | {seg['frozen']['gauc']:>11.4f} {seg['candidate']['gauc']:>9.4f} {seg['d_gauc']:>+7.4f}"
        )
    if "serving" in pq["whole_replay"]:
        w = pq["whole_replay"]["serving"]
        lines.append(f"served versions over the replay: AUC {w['auc']:.4f} GAUC {w['gauc']:.4f}")
    sps = results["samples_per_s"]
    lines.append(
        f"samples/s: model {sps['model']:.1f}, end to end {sps['end_to_end']:.1f} ({results['device']}, "
        f"{results['precision']}, {results['threads']} threads, load {results['loadavg_1m']['before']:.1f}"
        f" -> {results['loadavg_1m']['after']:.1f})"
    )
    for p in results.get("publish", []):
        lat = f"{p['publish_latency_s']:.2f}s" if p.get("publish_latency_s") is not None else "not confirmed"
        g = p.get("gate") or {}
        lines.append(
            f"published v{p['version']} (parent {p['parent']}): latency {lat} (export {p['export_s']:.2f}s,"
            f" parity {p['parity_s']:.2f}s, write {p['write_s']:.2f}s, Triton {p['served_s'] or 0:.2f}s);"
            f" gate D {g.get('diff', float('nan')):+.4f}, lower {g.get('lower', float('nan')):+.4f}"
        )
    if "refusals" in results:
        lines.append(f"refusals: {results['refusals'] or 'none'}")
    return "\n".join(lines)


def trainer_config(args: argparse.Namespace):
    from hisam.jobs.trainer_run import trainer_config as from_options

    return from_options(args, probation=args.min_samples)  # the bench watches a version as long as it gates


def run_direct(trainer, examples, max_records: int) -> tuple[list, list[dict]]:
    """The trainer core on the replay, micro-batch by micro-batch: (score log, per-batch rows)."""
    score_log, reports = [], []
    for i in range(0, len(examples), max_records):
        r = trainer.process(examples[i : i + max_records])
        score_log.append((r.users, r.labels, r.scores))
        reports.append({"train_seconds": r.seconds, "seconds": r.seconds, "trained": r.trained})
        if (i // max_records) % 20 == 0:
            log.info("%d / %d events, loss %.4f", i + r.trained, len(examples), r.loss)
    return score_log, reports


def main(args: argparse.Namespace) -> int:
    import torch

    from models.hmat.checkpoint import load_checkpoint
    from trainer.nearline import NearlineTrainer

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    warm, ckpt = load_checkpoint(args.checkpoint)
    replay = replay_examples(args, warm.config.max_items)
    examples, known, start = replay.examples, replay.known, replay.start
    profiles, tok_version, k_size = replay.profiles, replay.tokenizer_version, replay.codebook_size
    log.info("replaying %d events of %s from row %d", len(examples), args.dataset, start)
    results: dict = {
        "dataset": args.dataset,
        "checkpoint": str(args.checkpoint),
        "warm_start_train_rows": replay.trained_rows,
        "replay_rows": [start, start + len(examples)],
        "events": len(examples),
        "mode": "direct" if args.direct else ("kafka+triton" if args.triton else "kafka"),
        "lr": args.lr,
        "ema": args.ema,
    }
    table_ = profiles
    trainer = NearlineTrainer.from_checkpoint(args.checkpoint, lambda u: table_[u].tolist(), trainer_config(args))
    t0 = time.perf_counter()
    if args.direct:
        score_log, reports = run_direct(trainer, examples, args.max_records)
        service = None
    else:
        service, score_log, reports = run_service(args, trainer, warm, examples, tok_version, k_size, results)
    wall = time.perf_counter() - t0
    trained = trainer.trained
    model_s = sum(r["train_seconds"] for r in reports)
    e2e_s = sum(r["seconds"] for r in reports)
    results |= {
        "device": str(trainer.device),
        "precision": str(trainer.amp_dtype or "fp32"),
        "threads": torch.get_num_threads(),
        "model": {k: v for k, v in ckpt["model"].items() if k in ("n_layer", "hidden", "max_items", "n_sid")},
        "trained": trained,
        "counts": dict(trainer.counts),
        "prequential": prequential_figures(score_log, args.segment_size, known),
        "samples_per_s": {
            "model": trained / model_s if model_s else None,
            "end_to_end": trained / e2e_s if e2e_s else None,
        },
        "run_wall_s": wall,
    }
    if service is not None:
        lineage = service.state.lineage()
        published = [r for r in lineage if r["event"] == "published"]
        keys = ("version", "parent", "export_s", "parity_s", "write_s", "served_s", "publish_latency_s")
        keys += ("trained_while_loading",)
        results |= {
            "publish": [{**{k: r.get(k) for k in keys}, "gate": r["gate"].get("paired")} for r in published],
            "rollbacks": [r for r in lineage if r["event"] == "rollback"],
            "refusals": dict(Counter(r["reason"] for r in lineage if r["event"] == "refused")),
        }
    results["loadavg_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    line = json.dumps(results, default=float)
    if args.out:
        args.out.write_text(line + "\n")
    sys.stdout.write(table(results) + "\n" + line + "\n")
    return 0


def run_service(args, trainer, warm, examples, tok_version: str, k_size: int, results: dict):
    """The replay through a fresh broker into the trainer service (and Triton): (service, score log, batch rows)."""
    from export.template import Template
    from infra.services import kafka_broker
    from serving.repository import publish_version
    from stream import topics as tp
    from stream.producer import make_producer
    from trainer.config import ServiceConfig
    from trainer.samples import sample_bytes
    from trainer.service import TrainerService

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="hisam-bench-trainer-"))
    state_dir, repo, templates = work / "state", work / "repo", work / "onnx_templates"
    for d in (state_dir, repo):
        if d.exists() and any(d.iterdir()):
            raise SystemExit(f"{d} is not empty: use a fresh --work-dir")
    results["work_dir"] = str(work)
    with ExitStack() as stack:
        broker = stack.enter_context(kafka_broker())
        # One partition: produced up front, several partitions would drain in chunks of a fetch
        # each (~1,000 samples), so the trainer would learn from other users' later events
        # before scoring earlier ones; live, partitions advance together, and one keeps time order here.
        topic = tp.TRAINING_SAMPLES
        tp.ensure_topics(broker.bootstrap, [tp.TopicSpec(topic, 1), tp.TopicSpec(tp.DEAD_LETTERS, 1)])
        producer = make_producer(broker.bootstrap)
        t0 = time.perf_counter()
        for e in examples:
            producer.send(topic, key=str(e.user_id).encode(), value=sample_bytes(e, tok_version, k_size))
        producer.flush()
        producer.close()
        results["produce_s"] = time.perf_counter() - t0
        triton_url = None
        template = Template.load_or_build(warm.config, templates)  # the trace is not part of any latency
        publish_version(repo, template.render(warm, tok_version))  # version 1: the warm start, served
        if args.triton:
            from infra.triton import triton_server

            triton_url = stack.enter_context(triton_server(repo, poll_s=1.0)).url
        cfg = ServiceConfig(
            bootstrap=broker.bootstrap,
            state_dir=state_dir,
            repo=repo,
            max_records=args.max_records,
            max_wait_s=1.0,
            triton_url=triton_url,
            template_dir=templates,
            idle_exit_s=5.0,
            background_publish=not args.foreground_publish,
        )
        service = TrainerService(trainer, cfg)
        service.score_log = []
        service.run(threading.Event())
    return service, service.score_log, service.reports
