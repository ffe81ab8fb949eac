"""One backend's pass of the fault bench (the package docstring's steps 1-5)."""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from hisam.bench.faults import checks, inputs, rank, report, services
from stream import records as rec
from stream import topics as tp

log = logging.getLogger(__name__)

N_CODES = 6  # the tiny tokenizer's codes per item (3 shared + 1 per modality) = the tiny model's
CATALOGUE_BASE = 10_000  # item ids of the catalogue
NEW_ITEM_BASE = 900_000  # item ids that are not in the catalogue (early actions, poisoned items)
RANK_SHARE = 0.15  # of --inputs, malformed Rank calls


def run_backend(
    backend: str,
    tmp: Path,
    repo: Path,
    tok_dir: Path,
    n_inputs: int,
    n_valid: int,
    n_items: int,
    args: argparse.Namespace,
) -> dict:
    from features.store import OnlineStoreConfig, open_stream_store
    from infra.services import kafka_broker, redis_server
    from recipes.tokenizer.testing import synthetic_items

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    counts = inputs.kind_counts(n_inputs, RANK_SHARE, rank.RANK_MIN)
    n_new = counts["action_before_item"] + inputs.NAN_ITEMS + 2
    feats, _, _ = synthetic_items(n_items + n_new, seed=0)
    with ExitStack() as stack:
        broker = stack.enter_context(kafka_broker())
        redis_url = stack.enter_context(redis_server()).url if backend == "redis" else None
        cfg = OnlineStoreConfig(
            backend=backend, repo_dir=tmp / f"store-{backend}", redis_url=redis_url, stream_len=args.stream_len,
            n_codes=N_CODES,
        )  # fmt: skip
        app_id = f"bench-faults-{backend}"
        tp.ensure_topics(broker.bootstrap, services.topics(app_id))
        worker = services.SupervisedWorker(
            services.worker_args(broker.bootstrap, cfg, app_id, tok_dir), tmp / f"worker-{backend}.log"
        )
        worker.start()
        stack.callback(worker.stop)
        producer = checks.producer(broker.bootstrap)
        stack.callback(producer.close)
        watched = [tp.USER_ACTIONS, tp.ITEM_EVENTS, tp.action_retries(app_id)]

        def drain(what: str) -> checks.Drain:
            d = checks.wait_drained(broker.bootstrap, app_id, watched, args.drain_timeout, worker.worker.alive)
            log.info(
                "%s: %s drained in %.1fs%s", backend, what, d.seconds, f"; stalled {d.stalled}" if d.stalled else ""
            )
            return d

        # 1. The catalogue.
        now = int(time.time() * 1000)
        catalogue = [CATALOGUE_BASE + i for i in range(n_items)]
        items = [
            inputs.Record(
                tp.ITEM_EVENTS, str(i).encode(),
                rec.item_event(i, {m: x[k] for m, x in feats.items()}, now).SerializeToString(),
                inputs.VALID, inputs.ITEM_STORED,
            )
            for k, i in enumerate(catalogue)
        ]  # fmt: skip
        refused = checks.produce(producer, items, f"{backend} catalogue")
        drain("the catalogue")
        store = open_stream_store(cfg)
        stack.callback(store.close)
        known = sorted(store.read_item_sids(catalogue))
        if len(known) < max(10, n_items // 2):
            raise RuntimeError(f"only {len(known)} of {n_items} catalogue items were ingested; see {worker.log_path}")
        gen = inputs.Generator(
            args.seed, known, {m: x[n_items:] for m, x in feats.items()},
            [NEW_ITEM_BASE + j for j in range(n_new)], now,
        )  # fmt: skip
        plan = gen.plan(n_valid, counts)
        hostile_calls = rank.hostile_calls(rng, counts, plan.valid_users, known)
        valid_calls = rank.valid_calls(rng, max(20, len(hostile_calls)), plan.valid_users, known)
        calls = rank.interleave(rng, hostile_calls, valid_calls)
        half = len(calls) // 2
        tally = rank.RankTally()

        address = stack.enter_context(rank.rank_server(repo, cfg))
        client = rank.RankClient(address)
        stack.callback(client.close)

        # 2. Phase 1, with Rank calls meanwhile.
        with rank.CallsInBackground(client, calls[:half], tally):
            refused += checks.produce(producer, plan.phase1, f"{backend} phase 1")
            drain("phase 1")
        # 3. Corrupt some users (each has its phase-1 actions stored by now).
        stored = store.read_streams(plan.corrupt_users)
        before = {u: [] if s is None else list(s.event_ids) for u, s in zip(plan.corrupt_users, stored, strict=True)}
        if not all(before.values()):
            raise RuntimeError(f"users to corrupt have nothing stored to corrupt: {before}")
        for k, u in enumerate(plan.corrupt_users):
            services.corrupt_user(cfg, u, services.CORRUPTIONS[k % len(services.CORRUPTIONS)])
        for u in plan.corrupt_users:
            from hisam_pb.v1 import rank_pb2

            ids = known[:10]
            payload = rank_pb2.RankRequest(user_id=u, item_ids=ids, request_id=f"corrupt-{u}").SerializeToString()
            client.call(rank.Call("corrupt_user", payload, (u, ids), f"corrupt-{u}"), tally)
        # 4. Phase 2.
        with rank.CallsInBackground(client, calls[half:], tally):
            refused += checks.produce(producer, plan.phase2, f"{backend} phase 2")
            final = drain("phase 2")
        # 5. Judge.
        letters = checks.dead_letters(broker.bootstrap)
        verdict = checks.judge(plan, letters, store, args.stream_len, refused, before)
        errors = worker.log_errors()
        extra = {
            "worker_log_errors": len(errors),
            "worker_log_error_lines": [line[:300] for line in errors[:5]],
            "catalogue_items": n_items,
            "catalogue_ingested": len(known),
            "corrupted_users": len(plan.corrupt_users),
            "topic_max_message_bytes": services.BIG_TOPIC_BYTES,
        }
        return report.backend_result(verdict, tally, worker.exits, final, counts, time.perf_counter() - t0, extra)
