"""``hisam events produce``: replay a dataset's items and interactions into the topics.

Items first (so the stream can tokenize them before their actions arrive), then the
interactions in time order at ``--rate`` actions per second, keyed by user id.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from data import default_data_dir
from infra import kafka_security

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k", help="dataset name or directory (data.load_dataset)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--bootstrap", default=os.environ.get("HISAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    kafka_security.add_arguments(parser)  # TLS, SASL: docs/operations.md, Security: Kafka
    parser.add_argument("--rate", type=float, default=1000.0, help="actions per second (0: unthrottled)")
    parser.add_argument("--limit", type=int, default=0, help="replay at most this many interactions (0: all)")
    parser.add_argument("--no-items", action="store_true", help="skip the item events")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of topics created here")


def main(args: argparse.Namespace) -> int:
    from data import load_dataset
    from stream import producer as prod
    from stream import topics as tp

    ds = load_dataset(args.dataset, args.data_dir, progress=True)
    tp.ensure_topics(args.bootstrap, tp.default_topics(args.partitions))
    producer = prod.make_producer(args.bootstrap)
    try:
        if not args.no_items:
            st = prod.produce_items(producer, prod.item_events(ds.items, int(time.time() * 1000)))
            log.info("produced %d item events in %.1fs", st.sent, st.seconds)
        inter = (
            ds.interactions
            if not args.limit
            else ds.interactions.sort_values("timestamp", kind="stable").head(args.limit)
        )
        st = prod.produce_actions(producer, prod.actions_from_interactions(inter, ds.name), rate=args.rate or None)
        log.info("produced %d actions in %.1fs (%.0f/s)", st.sent, st.seconds, st.rate)
    finally:
        producer.close()
    return 0
