"""Controlled re-tokenisation: copy a namespace's items and user streams to a new tokenizer version.

docs/method.md §1 "Lifecycle": the tokenizer is frozen while the ranker trains, and a new
tokenizer version (monthly) triggers a re-tokenisation of items and streams. A user
stream stores per item only its semantic-ID tokens (no item id), so the old tokens are
turned back into item ids through the *old* namespace's item table (``item_sid``: every
ingested item's SIDs), and the items are re-encoded with the new frozen tokenizer:

    old tokens --(old item table, inverted)--> item id --(new tokenizer)--> new tokens

Blue/green: everything is written into a separate namespace (another Feast project, i.e.
another Redis key suffix or SQLite table prefix, and its own feature repo); the source
namespace is only read, so serving keeps reading it until the cut-over. Steps:

1. items: encode every item of the item source (the item-events topic or a dataset) with
   the new tokenizer, under the collision rule of ``models.tokenizer.collisions`` in item-id
   order (the new item table is collision-free, so the *next* migration can invert it),
   and write SIDs + tokenizer version into the target;
2. streams: for every user of the source, map each item's tokens (``TokenMap``) and write
   the whole user state (stream, seen window, profile counters) into the target. An event
   whose tokens cannot be mapped (``UNKNOWN_SID``: no item of the old table has them, e.g.
   an item re-ingested with new features since; ``ITEM_NOT_IN_SOURCE``: the item source
   has no usable event for the item; ``AMBIGUOUS_SID``: several old items share them and
   re-encode differently) is left out of the new stream, reported and counted; its event
   id stays in the seen window, so a redelivery of it is still a duplicate;
3. verify: source and target re-read; per user the target holds exactly the source's
   events less the unmapped ones, in order, with the same actions, times, seen window and
   counters; for a sample of users, both streams decode to the same item ids through
   their own item tables (the target's read back from the store); optionally the sample
   read through Feast equals the direct read. A source that changed since step 2 (a
   stream worker still running) fails this check.

The command around it (the stop / migrate / restart procedure) is ``hisam tokenizer
migrate`` (hisam/jobs/tokenizer_migrate.py). Letters: N items, L tokens per item, E events.
"""

from __future__ import annotations

from stream.retokenize.items import ItemCatalogue, catalogue_from_dataset, catalogue_from_item_events, encode_catalogue
from stream.retokenize.migrate import MigrationReport, migrate_namespace
from stream.retokenize.plan import (
    AMBIGUOUS_SID,
    ITEM_NOT_IN_SOURCE,
    TOKENIZER_INPUT,
    UNKNOWN_SID,
    MigrationError,
    check_namespaces,
    default_project,
    namespace_of,
)
from stream.retokenize.streams import TokenMap, UnmappedEvent, build_token_map, migrate_state
from stream.retokenize.verify import VerifyResult, verify_namespace

__all__ = [
    "AMBIGUOUS_SID",
    "ITEM_NOT_IN_SOURCE",
    "TOKENIZER_INPUT",
    "UNKNOWN_SID",
    "ItemCatalogue",
    "MigrationError",
    "MigrationReport",
    "TokenMap",
    "UnmappedEvent",
    "VerifyResult",
    "build_token_map",
    "catalogue_from_dataset",
    "catalogue_from_item_events",
    "check_namespaces",
    "default_project",
    "encode_catalogue",
    "migrate_namespace",
    "migrate_state",
    "namespace_of",
    "verify_namespace",
]
