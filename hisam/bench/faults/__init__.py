"""``hisam bench faults``: hostile input against the running system, and proof that valid data survives it.

Per backend (Redis, then SQLite), on a fresh embedded broker (and a private Redis) started
here: a real stream worker process (``python -m hisam.jobs.stream_worker``, with a tiny
trained tokenizer so that it ingests item events too) under a tiny restart loop that counts
every exit, and a real gRPC Rank server (``serving.server``, in process, the tiny HMAT in
ONNX Runtime) reading the same store.

1. A catalogue of items goes through ``item-events``; the items the worker stored are the
   ones valid actions use.
2. Phase 1: valid actions (``--valid-actions`` over users with ~15 actions each) with about
   half of the hostile inputs mixed in at random places, and Rank calls (malformed ones
   interleaved with valid ones) in a thread meanwhile. The bench waits until the group's
   committed offsets reach every topic's end.
3. Some users' stored state is corrupted directly in Redis / SQLite (a garbage field, a
   truncated list, a foreign Value, a wrong type); their later actions must be
   dead-lettered as ``corrupt_user_state`` (they are not in the valid set, and counted as
   ``corrupt_user_actions``); Rank calls for them are counted as ``rank_corrupt_user``
   (INTERNAL by design, naming the user), apart from ``rank_internal_errors``.
4. Phase 2: the rest of the valid actions and hostile inputs, redeliveries of phase-1
   actions, and actions sent just before their item. Drain again (the retry topic too).
5. Judge (``checks``): every dead letter is matched to its record by SHA-256; each record's
   fate must be one its kind allows (``unexpected_outcomes`` otherwise); per user the stored
   event ids must be the expected valid ones, in order, each once (``lost_actions``,
   ``doubled_actions``, ``misordered_users``).
   An item event the worker refuses as ``sid_space_full`` (every ID the collision rule may
   give it is taken: the tiny tokenizer's 16-code last codebook fills up on similar synthetic
   items, a documented refusal) is allowed; an action sent before such an item must then be
   dead-lettered as ``unknown_item`` and is not counted as valid (``early_item_refused``).

Hostile kinds (``inputs.STREAM_KINDS``, ``rank.RANK_KINDS``): truncated and random bytes,
oversized records of 1-2 MB, wrong protobuf types, NaN/inf embeddings, huge and negative ids,
long and non-UTF-8 event ids, duplicate event ids, far-future event times, corrupted stored
state, actions before their item; on Rank: raw garbage bytes, requests over 1 MiB, a 200-byte
request_id, negative, duplicate, too many, no and huge ids.

The embedded broker refuses records over ~1 MiB (its message.max.bytes); the bench creates
``user-actions`` and ``item-events`` with the topic config max.message.bytes = 4 MiB (as a
production topic may allow), so the 1-2 MB records do reach the worker.

Prints a table, then one JSON line: per backend under its name, totals at the top level.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", nargs="+", default=["redis", "sqlite"], choices=["redis", "sqlite"])
    parser.add_argument("--inputs", type=int, default=None, help="hostile inputs per backend (default 1000; quick 150)")
    parser.add_argument("--valid-actions", type=int, default=None, help="valid actions per backend (3000; quick 300)")
    parser.add_argument("--items", type=int, default=None, help="catalogue items ingested first (200; quick 60)")
    parser.add_argument("--stream-len", type=int, default=300, help="T of the store (more than any user's actions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI): every kind, fewer of each")
    parser.add_argument("--drain-timeout", type=float, default=240.0, help="seconds to wait for each drain")
    parser.add_argument(
        "--work-dir", type=Path, default=Path("artifacts/bench/faults"), help="cache of the tokenizer and ONNX export"
    )


def _sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    quick = (150, 300, 60)
    full = (1000, 3000, 200)
    d = quick if args.quick else full
    return (args.inputs or d[0], args.valid_actions or d[1], args.items or d[2])


def main(args: argparse.Namespace) -> int:
    from hisam.bench.faults import model, report
    from hisam.bench.faults.run import run_backend

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind the services below
    n_inputs, n_valid, n_items = _sizes(args)
    t0 = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = model.tokenizer_dir(args.work_dir)
    result: dict = {"bench": "faults", "machine": report.machine(), "inputs_per_backend": n_inputs}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hisam-bench-faults-")))
        repo = model.model_repo(args.work_dir, tmp / "model_repo")
        for b in args.backends:
            log.info("%s: %d hostile inputs among %d valid actions", b, n_inputs, n_valid)
            result[b] = run_backend(b, tmp, repo, tok_dir, n_inputs, n_valid, n_items, args)
    result |= report.totals({b: result[b] for b in args.backends})
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    report.write(result, args.backends)
    return 0
