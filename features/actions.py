"""What a user action means to the model: the binary label every component derives from it.

The stream stores each history item's raw action type (``ActionType`` in events.proto); the
training samples, the near-line trainer and Rank all turn it into the model's binary action
with ``label_of``, so the three can never disagree. Positive feedback is a click, a like or a
purchase; impressions, dislikes and skips are negatives (docs/method.md §5's binary label; the
dataset replay maps ratings the same way).
"""

from __future__ import annotations

from hisam_pb.v1 import events_pb2 as pb

POSITIVE_ACTIONS = frozenset({pb.ACTION_TYPE_CLICK, pb.ACTION_TYPE_LIKE, pb.ACTION_TYPE_PURCHASE})


def label_of(action: int) -> float:
    """1.0 for a positive action type, 0.0 for any other."""
    return 1.0 if action in POSITIVE_ACTIONS else 0.0
