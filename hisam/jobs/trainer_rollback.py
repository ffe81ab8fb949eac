"""``hisam trainer rollback``: withdraw the newest version(s) so that Triton serves an earlier one.

Hides every version newer than ``--to`` (default: the one before the newest) by renaming
its directories out of the repository (trainer/publisher.py); Triton (poll mode,
``latest 1``) then loads the now-newest version. A running trainer notices at its next
micro-batch, serves that version's weights again and restarts its candidate from them;
the rollback is recorded in the state's lineage.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repo", type=Path, default=Path("artifacts/model_repo"))
    parser.add_argument("--state-dir", type=Path, default=Path("artifacts/trainer"), help="where lineage is recorded")
    parser.add_argument("--to", type=int, default=None, help="Triton version to serve (default: the previous one)")
    parser.add_argument("--reason", default="manual")


def main(args: argparse.Namespace) -> int:
    from serving.repository import published_versions
    from trainer.lineage import StateDir
    from trainer.publisher import rollback_to

    versions = published_versions(args.model_repo)
    served, hidden = rollback_to(args.model_repo, args.to)
    StateDir(args.state_dir).append_lineage(
        {"event": "rollback", "auto": False, "command": True, "hidden": hidden, "to": served, "reason": args.reason,
         "model_version": versions[served]}
    )  # fmt: skip
    print(f"withdrew versions {hidden}; the repository now serves version {served} ({versions[served]})")
    return 0
