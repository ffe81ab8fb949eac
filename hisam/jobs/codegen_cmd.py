"""``hisam codegen``: compile proto/ into hisam_pb/ (see hisam.codegen)."""

from __future__ import annotations

import argparse
import logging

from hisam.codegen import generate

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def main(args: argparse.Namespace) -> int:
    del args
    protos = generate()
    log.info("compiled %d proto files", len(protos))
    return 0
