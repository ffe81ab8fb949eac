"""TrainingSample bytes -> validated model inputs (the trainer's side of stream/records.py).

What a sample holds (stream/processing.py, features/store/): the user's stream *before*
the action, oldest first, bounded by the online store's T, as global semantic-ID tokens
(codebook c's code x is ``c * K + x``, the tokenizer's layout) and ``ActionType`` values;
the action's item as target with its global tokens, and the binary label
(``features.actions.label_of``). HMAT takes local codes in [0, K) and binary actions, exactly
the conversion serving does (``serving.online.history_of`` / ``to_codes``), so training and
serving read the same stream the same way.

The target is trained and scored as a *candidate* of that history (``Example.sequence``):
the stream Rank builds for the same user at the same moment, so the trainer's score of an
event is the score serving would have given it (docs/method.md §4), and the SFT loss is read at
exactly the anchor serving reads. History items are not trained again: each was the
target of its own, earlier sample (re-training them at every later sample would weigh a
user's old actions by how many actions followed them).

A sample the model cannot take raises ``SampleRejected`` with a stable reason; the service
counts, logs and dead-letters it (nothing is skipped silently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from features.actions import label_of
from hisam_pb.v1 import events_pb2 as pb
from models.hmat.sequence import StreamLayout, UserSequence
from stream.records import parse_message

DECODE_ERROR = "decode_error"
TOKENIZER_MISMATCH = "tokenizer_mismatch"
SHAPE_MISMATCH = "shape_mismatch"
TOKEN_RANGE = "token_out_of_range"
INVALID_FIELD = "invalid_field"


class SampleRejected(ValueError):
    """A sample the trainer cannot use; ``reason`` is one of the module constants."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Example:
    """One decoded sample: the history (T, k) and target (k,) as local codes, binary actions and label."""

    user_id: int
    event_id: str
    event_time_ms: int
    item_id: int
    history_codes: np.ndarray  # (T, k) int64 in [0, K)
    history_actions: np.ndarray  # (T,) int64 in {0, 1}
    target_codes: np.ndarray  # (k,) int64 in [0, K)
    label: int

    def sequence(self, profile: tuple[int, ...] | list[int], max_items: int) -> UserSequence:
        """The Rank stream of this event: profile, the last ``max_items`` history items, the target as candidate."""
        return UserSequence(
            profile=list(profile),
            sids=torch.from_numpy(self.history_codes[-max_items:]),
            actions=torch.from_numpy(self.history_actions[-max_items:]),
            candidates=torch.from_numpy(self.target_codes[None]),
        )


def _local(tokens: np.ndarray, codebook_size: int, what: str) -> np.ndarray:
    codes = tokens - np.arange(tokens.shape[-1], dtype=np.int64) * codebook_size
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise SampleRejected(TOKEN_RANGE, f"{what} holds tokens outside the model's codebooks of size {codebook_size}")
    return codes


def decode_sample(raw: bytes | None, layout: StreamLayout, tokenizer_version: str) -> Example:
    """Parse and validate one TrainingSample for a model of ``layout`` trained on ``tokenizer_version``.

    ``tokenizer_version`` "" accepts any version (a model whose tokenizer is unknown).
    """
    s = parse_message(pb.TrainingSample, raw, SampleRejected)
    if not s.event_id:
        raise SampleRejected(INVALID_FIELD, "event_id is empty")
    if tokenizer_version and s.tokenizer_version != tokenizer_version:
        raise SampleRejected(
            TOKENIZER_MISMATCH,
            f"sample tokens come from tokenizer {s.tokenizer_version!r}, the model was trained on {tokenizer_version!r}",
        )
    k = layout.n_sid
    if s.n_codes != k or len(s.target_tokens) != k:
        raise SampleRejected(
            SHAPE_MISMATCH, f"{s.n_codes} codes per item ({len(s.target_tokens)} target tokens), model takes {k}"
        )
    hist = np.asarray(s.history_tokens, dtype=np.int64)
    if hist.size % k or hist.size // k != len(s.history_actions):
        raise SampleRejected(
            SHAPE_MISMATCH, f"{hist.size} history tokens do not make {len(s.history_actions)} items of {k} codes"
        )
    actions = np.fromiter((label_of(int(a)) for a in s.history_actions), np.int64, len(s.history_actions))
    return Example(
        user_id=int(s.user_id),
        event_id=s.event_id,
        event_time_ms=int(s.event_time_ms),
        item_id=int(s.target_item_id),
        history_codes=_local(hist.reshape(-1, k), layout.codebook_size, "the history"),
        history_actions=actions,
        target_codes=_local(np.asarray(s.target_tokens, dtype=np.int64), layout.codebook_size, "the target"),
        label=int(s.label > 0.5),
    )


def sample_bytes(ex: Example, tokenizer_version: str, codebook_size: int, action_of_label=None) -> bytes:
    """The TrainingSample of an Example (tests and the benchmark replay build samples this way).

    History actions are written as ``ActionType`` values via ``action_of_label`` (default:
    LIKE for 1, DISLIKE for 0, which ``label_of`` maps back to the same binary action).
    """
    to_action = action_of_label or (lambda y: pb.ACTION_TYPE_LIKE if y else pb.ACTION_TYPE_DISLIKE)
    k = ex.target_codes.shape[0]
    offsets = np.arange(k, dtype=np.int64) * codebook_size
    return pb.TrainingSample(
        user_id=ex.user_id,
        history_tokens=(ex.history_codes.reshape(-1, k) + offsets).ravel().tolist(),
        history_actions=[int(to_action(int(a))) for a in ex.history_actions],
        target_item_id=ex.item_id,
        target_tokens=(ex.target_codes + offsets).tolist(),
        target_action=to_action(ex.label),
        label=float(ex.label),
        event_id=ex.event_id,
        event_time_ms=ex.event_time_ms,
        tokenizer_version=tokenizer_version,
        n_codes=k,
    ).SerializeToString()
