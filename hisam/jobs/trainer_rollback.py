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
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the repository's writer lock (a running trainer may be publishing)",
    )


# Exit status when the repository's writer lock stayed taken (EX_TEMPFAIL): try again later.
EXIT_LOCKED = 75


def main(args: argparse.Namespace) -> int:
    from serving.repository import RepositoryLocked, published_versions
    from trainer.lineage import StateDir
    from trainer.publisher import rollback_to

    versions = published_versions(args.model_repo)
    try:
        served, hidden = rollback_to(args.model_repo, args.to, lock_timeout_s=args.lock_timeout)
    except RepositoryLocked as e:
        log.error("rollback not done: %s", e)
        return EXIT_LOCKED
    StateDir(args.state_dir).append_lineage(
        {"event": "rollback", "auto": False, "command": True, "hidden": hidden, "to": served, "reason": args.reason,
         "model_version": versions[served]}
    )  # fmt: skip
    print(f"withdrew versions {hidden}; the repository now serves version {served} ({versions[served]})")
    return 0
