"""``hisam``: one entry point for every job.

Each command lives in its own module and is imported only when it runs, so that light
commands stay light (``import feast`` alone costs seconds; see ../shared/ENVIRONMENT.md).
A command module exposes ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (command path, module, help). Nested commands are written "group sub".
COMMANDS: list[tuple[str, str, str]] = [
    ("run", "hisam.jobs.run_all", "the main job on the embedded defaults"),
    ("codegen", "hisam.jobs.codegen_cmd", "generate Python code from proto/"),
    ("data prepare", "hisam.jobs.data_cmd", "fetch a dataset and build its item modalities"),
    ("tokenizer train", "hisam.jobs.tokenizer_train", "train a semantic-ID tokenizer (DST, MACRec, RQ-VAE)"),
    ("tokenizer eval", "hisam.jobs.tokenizer_eval", "evaluate tokenizers and write a report"),
    ("tokenizer encode", "hisam.jobs.tokenizer_encode", "encode items with a frozen tokenizer"),
    ("bench tokenizer", "hisam.bench.tokenizer", "tokenizer quality and encode-speed benchmark"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hisam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
        p = sub.add_parser(words[-1], help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.set_defaults(_lazy_args=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse once to find the command, then let its module add its own arguments.
    known, _ = parser.parse_known_args(argv)
    mod = importlib.import_module(known._module)
    full = build_parser()
    for action in full._subparsers._group_actions:  # locate the leaf parser again
        leaf = action.choices[known.command]
        if getattr(known, "subcommand", None):
            leaf = leaf._subparsers._group_actions[0].choices[known.subcommand]
        mod.add_arguments(leaf)
    args = full.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(mod.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
