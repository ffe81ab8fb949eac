"""``hisam bench trainer``: the near-line trainer on a replay of ML-100K's later part.

Setup: a ranker checkpoint trained offline on the train split (the first 90% of
interactions, METHOD.md §5) is the warm start. The test part (the last 10%) is replayed in
time order as TrainingSamples through a fresh broker (the stream's sample format, with the
user's history up to, not including, the event: the samples the stream worker would emit;
``hisam bench stream`` measures that worker), and the trainer service consumes them with
Kafka, snapshots and commits exactly as ``hisam trainer run`` does.

Figures (the last line of output is one JSON object):

* ``prequential``: AUC / GAUC over the whole replay of the near-line candidate, of the
  version Triton served at each moment, and of the same model frozen at the warm start,
  every event scored before any model trained on it; also per chronological segment;
* ``samples_per_s``: the model work of a micro-batch (three prequential scorings + SFT
  steps) and end to end (decode, Kafka, gate, snapshot fsyncs, commit), on this device;
* ``publish``: for each published version, gate passed -> Triton serving it (ready for
  the exact version number; Rank reports the version Triton answered with, so its next call
  is scored by it), split into export, parity, write and Triton load (``--triton``);
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
from contextlib import ExitStack
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="warm-start ranker checkpoint (train split)")
    parser.add_argument("--tokenizer", type=Path, default=Path("artifacts/tokenizers/dst"))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--limit", type=int, default=0, help="replay at most this many test events (0: all)")
    parser.add_argument("--max-records", type=int, default=256, help="micro-batch size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--window", type=int, default=4000)
    parser.add_argument("--min-samples", type=int, default=1000)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--segments", type=int, default=5, help="chronological segments for the AUC trend")
    parser.add_argument("--triton", action="store_true", help="publish into a real Triton and time it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep state, repository, templates here")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def replay_examples(args: argparse.Namespace, max_items: int):
    """(examples in time order, profile table, tokenizer version, codebook size) of the test part."""
    from hisam.data import load_dataset
    from hisam.ranker import load_inputs
    from hisam.ranker.profiles import ProfileVocab
    from hisam.trainer.samples import Example
    from models.hmat.train import read_checkpoint_config

    ckpt = read_checkpoint_config(args.checkpoint)
    vocab = ProfileVocab.from_dict(ckpt["profile_vocab"])
    ds = load_dataset(args.dataset, args.data_dir, progress=False)
    inputs = load_inputs(ds, ckpt.get("variant", "hmat"), args.tokenizer, vocab)
    if inputs.tokenizer_version != ckpt.get("tokenizer_version"):
        raise SystemExit(
            f"{args.checkpoint} was trained on tokenizer {ckpt.get('tokenizer_version')}, not {inputs.tokenizer_version}"
        )
    inter = ds.interactions
    users, items, labels = (inter[c].to_numpy() for c in ("user_idx", "item_idx", "label"))
    n_train = len(ds.train)
    history: dict[int, list[int]] = {}
    examples = []
    for row in range(len(inter)):  # log order = time order (the split's order)
        u = int(users[row])
        past = history.setdefault(u, [])
        if row >= n_train:
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
    if args.limit:
        examples = examples[: args.limit]
    return examples, inputs.profiles, inputs.tokenizer_version, inputs.codebook_size


def segment_metrics(log_rows, segments: int) -> dict:
    from hisam.trainer.prequential import metrics_of

    users = np.concatenate([u for u, _, _ in log_rows])
    labels = np.concatenate([y for _, y, _ in log_rows])
    models = [m for m in log_rows[0][2] if m != "parent"]
    scores = {m: np.concatenate([s[m] for _, _, s in log_rows]) for m in models}
    whole = {m: metrics_of(users, labels, s) for m, s in scores.items()}
    bounds = np.linspace(0, len(labels), segments + 1).astype(int)
    per = [
        {"rows": [int(a), int(b)], **{m: metrics_of(users[a:b], labels[a:b], s[a:b]) for m, s in scores.items()}}
        for a, b in itertools.pairwise(bounds)
    ]
    return {"whole_replay": whole, "segments": per}


def main(args: argparse.Namespace) -> int:
    import torch

    from hisam.services import kafka_broker
    from hisam.trainer.core import NearlineTrainer, TrainerConfig
    from hisam.trainer.onnx_export import Template
    from hisam.trainer.samples import sample_bytes
    from hisam.trainer.service import ServiceConfig, TrainerService
    from models.hmat.train import load_checkpoint
    from serving.repository import publish_version
    from stream import topics as tp

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    warm, ckpt = load_checkpoint(args.checkpoint)
    examples, profiles, tok_version, k_size = replay_examples(args, warm.config.max_items)
    log.info("replaying %d test events of %s", len(examples), args.dataset)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="hisam-bench-trainer-"))
    state_dir, repo, templates = work / "state", work / "repo", work / "onnx_templates"
    for d in (state_dir, repo):
        if d.exists() and any(d.iterdir()):
            raise SystemExit(f"{d} is not empty: use a fresh --work-dir")
    results: dict = {"dataset": args.dataset, "checkpoint": str(args.checkpoint), "events": len(examples)}
    with ExitStack() as stack:
        broker = stack.enter_context(kafka_broker())
        topic = "training-samples"
        tp.ensure_topics(broker.bootstrap, tp.default_topics(4))
        from stream.producer import make_producer

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
            from serving.triton import triton_server

            triton_url = stack.enter_context(triton_server(repo, poll_s=1.0)).url
        config = TrainerConfig(
            lr=args.lr,
            batch_size=args.batch_size,
            window=args.window,
            min_samples=args.min_samples,
            gate_window=args.window,
            margin=args.margin,
            probation=args.min_samples,
            device=args.device,
        )
        table = profiles
        trainer = NearlineTrainer.from_checkpoint(args.checkpoint, lambda u: table[u].tolist(), config)
        cfg = ServiceConfig(
            bootstrap=broker.bootstrap,
            state_dir=state_dir,
            repo=repo,
            max_records=args.max_records,
            max_wait_s=1.0,
            triton_url=triton_url,
            template_dir=templates,
            idle_exit_s=5.0,
        )
        service = TrainerService(trainer, cfg)
        service.score_log = []
        t0 = time.perf_counter()
        service.run(threading.Event())
        wall = time.perf_counter() - t0
    trained = trainer.trained
    model_s = sum(r["train_seconds"] for r in service.reports)
    e2e_s = sum(r["seconds"] for r in service.reports)
    published = [r for r in service.state.lineage() if r["event"] == "published"]
    results |= {
        "device": str(trainer.device),
        "precision": str(trainer.amp_dtype or "fp32"),
        "threads": torch.get_num_threads(),
        "model": {k: v for k, v in ckpt["model"].items() if k in ("n_layer", "hidden", "max_items", "n_sid")},
        "trained": trained,
        "counts": dict(trainer.counts),
        "prequential": segment_metrics(service.score_log, args.segments),
        "samples_per_s": {
            "model": trained / model_s if model_s else None,
            "end_to_end": trained / e2e_s if e2e_s else None,
        },
        "run_wall_s": wall,
        "publish": [
            {
                k: r.get(k)
                for k in ("version", "parent", "export_s", "parity_s", "write_s", "served_s", "publish_latency_s")
            }
            for r in published
        ],
        "rollbacks": [r for r in service.state.lineage() if r["event"] == "rollback"],
        "refusals": sum(1 for r in service.state.lineage() if r["event"] == "refused"),
        "loadavg_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "work_dir": str(work),
    }
    line = json.dumps(results, default=float)
    if args.out:
        args.out.write_text(line + "\n")
    sys.stdout.write(line + "\n")
    return 0
