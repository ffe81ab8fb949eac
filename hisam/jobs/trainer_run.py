"""``hisam trainer run``: the near-line trainer service (trainer/service.py).

Consumes training-samples with its own consumer group, fine-tunes the candidate near-line,
and publishes gated versions into the Triton model repository. The first start needs
``--checkpoint`` (the serving checkpoint: published as the first version on an empty
repository, adopted when the repository already serves it); later starts resume from
``--state-dir``. ``--triton-url`` confirms that Triton serves every published version
before it becomes the serving model; the wait runs beside the training loop
(``--foreground-publish``: on it). The gate is a paired test of the candidate against the
serving model on the same recent events (``--confidence``, ``--margin``,
``--min-improvement``, ``--gate-method``; trainer/paired.py).
Profiles come from the checkpoint's vocabulary and ``--dataset``'s users table, as
``hisam serve`` builds them, so training and serving open every stream with the same tokens.
Runs until SIGTERM / Ctrl-C (the current micro-batch finishes and is committed).

Fault injection (the reliability tests, trainer/faults.py): the faults are armed from the
environment, so a test arms them in the child process it starts:
``HISAM_FAULT_CORRUPT_AFTER_PUBLISHES=N`` corrupts the candidate right after the N-th publish,
``HISAM_FAULT_CORRUPT`` says how (``scramble``, the default, or ``nan``), and
``HISAM_FAULT_EXIT_IN_PUBLISH`` exits in the middle of a publish (``staged`` or ``first_moved``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from data import default_data_dir
from infra import kafka_security
from infra.triton_access import add_client_arguments, client_access_from_args

log = logging.getLogger(__name__)


# Exit status when dead letters stayed undelivered after retries (EX_IOERR): offsets past
# them were not committed, so a restart reprocesses and sends them again.
EXIT_UNDELIVERED = 74


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="warm-start (serving) ranker checkpoint")
    parser.add_argument("--state-dir", type=Path, default=Path("artifacts/trainer"), help="durable trainer state")
    parser.add_argument("--model-repo", type=Path, default=Path("artifacts/model_repo"), help="Triton model repository")
    parser.add_argument("--bootstrap", default=os.environ.get("HISAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    kafka_security.add_arguments(parser)  # TLS, SASL: docs/operations.md, Security: Kafka
    parser.add_argument("--group-id", default="hisam-trainer")
    parser.add_argument("--topic", default="training-samples")
    parser.add_argument("--dead-letter-topic", default="dead-letters")
    parser.add_argument("--template-dir", type=Path, default=None, help="traced ONNX templates (default: in state)")
    parser.add_argument("--publish-timeout", type=float, default=120.0, help="seconds to wait for Triton to serve")
    parser.add_argument("--triton-url", default=os.environ.get("HISAM_TRITON_URL"), help="gRPC host:port to confirm")
    add_client_arguments(parser)
    parser.add_argument(
        "--target",
        choices=["cpu", "gpu"],
        default="cpu",
        help="model configs published: cpu (Python backend running ONNX Runtime) or gpu (onnxruntime + TensorRT)",
    )
    parser.add_argument("--dataset", default=None, help="users table for profile tokens (as hisam serve)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--max-records", type=int, default=256, help="micro-batch size")
    parser.add_argument("--max-wait", type=float, default=2.0, help="seconds a micro-batch may wait to fill")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (learner.py: how it was chosen)")
    parser.add_argument("--ema", type=float, default=0.98, help="publish an EMA of the trained weights (decay/step)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per optimiser step")
    parser.add_argument("--window", type=int, default=4000, help="rolling prequential window")
    parser.add_argument("--min-samples", type=int, default=1000, help="samples since the last publish before a gate")
    parser.add_argument("--gate-window", type=int, default=2000, help="latest samples the gate compares on")
    parser.add_argument(
        "--margin", type=float, default=0.0, help="pass when the lower bound of AUC(cand) - AUC(serving) >= -margin"
    )
    parser.add_argument("--min-improvement", type=float, default=0.0, help="... and AUC(cand) - AUC(serving) >= this")
    parser.add_argument("--confidence", type=float, default=0.9, help="one-sided confidence of the gate's bounds")
    parser.add_argument("--gate-method", default="bootstrap", choices=("bootstrap", "delong"), help="paired test")
    parser.add_argument("--gate-unit", default="user", choices=("user", "event"), help="what the bootstrap resamples")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per gate decision")
    parser.add_argument("--probation", type=int, default=1000, help="samples a new version is watched")
    parser.add_argument("--rollback-margin", type=float, default=0.01)
    parser.add_argument("--keep", type=int, default=5, help="versions kept in the repository")
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=60.0,
        help="seconds a publish or rollback waits for the repository's writer lock (then it is refused, retried later)",
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda'")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--full-export", action="store_true", help="trace every candidate (slow; no template)")
    parser.add_argument(
        "--foreground-publish", action="store_true", help="wait for Triton on the training loop (default: background)"
    )
    parser.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    parser.add_argument("--max-samples", type=int, default=None, help="exit after training this many samples")
    from infra.observability import add_metrics_arguments

    add_metrics_arguments(parser)


# TrainerConfig fields whose option has another name.
_OPTION_OF = {"keep_versions": "keep"}


def trainer_config(args: argparse.Namespace, **override):
    """The TrainerConfig of a command's options: every field whose option the command has
    (``trainer run`` has all of them; ``bench trainer`` a subset, the rest keep their defaults)."""
    from dataclasses import fields

    from trainer.config import TrainerConfig

    values = {
        f.name: getattr(args, _OPTION_OF.get(f.name, f.name))
        for f in fields(TrainerConfig)
        if hasattr(args, _OPTION_OF.get(f.name, f.name))
    }
    return TrainerConfig(**(values | override))


def build_service(args: argparse.Namespace):
    import torch

    from hisam.jobs.serve import load_profiles
    from trainer.config import ServiceConfig
    from trainer.lineage import StateDir
    from trainer.nearline import NearlineTrainer
    from trainer.service import TrainerService

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if checkpoint is None:
        loaded = StateDir(args.state_dir).current()
        if loaded is None:
            raise SystemExit("the first start needs --checkpoint (the serving checkpoint)")
        checkpoint = loaded  # a snapshot is a checkpoint too; resume overwrites the weights anyway
    args.checkpoint = checkpoint
    profiles = load_profiles(args)
    config = trainer_config(args)
    trainer = NearlineTrainer.from_checkpoint(checkpoint, profiles.tokens, config)
    log.info(
        "trainer on %s, %s (target %s)", trainer.device, trainer.amp_dtype or "fp32", args.target
    )  # --target gpu with --device auto trains on CUDA under autocast (learner.py "Precision")
    cfg = ServiceConfig(
        bootstrap=args.bootstrap,
        state_dir=args.state_dir,
        repo=args.model_repo,
        group_id=args.group_id,
        topic=args.topic,
        dead_letter_topic=args.dead_letter_topic,
        template_dir=args.template_dir,
        publish_timeout_s=args.publish_timeout,
        max_records=args.max_records,
        max_wait_s=args.max_wait,
        triton_url=args.triton_url,
        triton_access=client_access_from_args(args),
        target=args.target,
        full_export=args.full_export,
        idle_exit_s=args.idle_exit,
        max_samples=args.max_samples,
        background_publish=not args.foreground_publish,
        lock_timeout_s=args.lock_timeout,
        faults=faults_from_environment(),
    )
    return TrainerService(trainer, cfg)


def faults_from_environment():
    """The faults a test armed in this process's environment (module docstring); none by default."""
    from serving.repository import FAULT_ENV
    from trainer.faults import Faults

    return Faults(
        corrupt_after_publishes=int(os.environ.get("HISAM_FAULT_CORRUPT_AFTER_PUBLISHES", "0")) or None,
        corrupt=os.environ.get("HISAM_FAULT_CORRUPT") or "scramble",  # type: ignore[arg-type]
        exit_in_publish=os.environ.get(FAULT_ENV) or None,  # type: ignore[arg-type]
    )


def main(args: argparse.Namespace) -> int:
    from infra.observability import metrics_server

    service = build_service(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from trainer.consumer import DeliveryError

    with metrics_server(args.metrics_port, args.metrics_addr):
        try:
            service.run(stop)
        except DeliveryError as e:  # nothing past the undelivered dead letters was committed
            log.error("trainer stopped: %s; restart it to retry from the last commit", e)
            return EXIT_UNDELIVERED
    return 0


if __name__ == "__main__":  # tests run it as a subprocess they can kill
    from hisam.cli import run_standalone

    run_standalone("hisam trainer run", __doc__, add_arguments, main)
