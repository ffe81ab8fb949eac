"""TrainingSample bytes -> validated model inputs (trainer/samples.py), and the reasons a sample is rejected."""

from __future__ import annotations

import numpy as np
import pytest

from hisam_pb.v1 import events_pb2 as pb
from stream import records as rec
from trainer import samples as sm
from trainer.testing import CODEBOOK, TOKENIZER, synthetic_examples, tiny_config


def test_samples_decode_as_serving_reads_the_stream() -> None:
    """A TrainingSample as stream/records.py writes it: global tokens, ActionType history -> local codes, labels."""
    layout = tiny_config().layout
    offsets = np.arange(6) * CODEBOOK
    hist = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]) + offsets
    ev = rec.action_event("e1", 3, 42, pb.ACTION_TYPE_CLICK, 1_700_000_000_000)
    raw = rec.training_sample(
        ev, hist, np.array([pb.ACTION_TYPE_LIKE, pb.ACTION_TYPE_SKIP]), tuple(offsets + 5), TOKENIZER
    )
    ex = sm.decode_sample(raw.SerializeToString(), layout, TOKENIZER)
    np.testing.assert_array_equal(ex.history_codes, hist - offsets)
    np.testing.assert_array_equal(ex.history_actions, [1, 0])
    np.testing.assert_array_equal(ex.target_codes, [5] * 6)
    assert (ex.label, ex.user_id, ex.item_id, ex.event_id) == (1, 3, 42, "e1")
    assert (
        sm.decode_sample(sm.sample_bytes(ex, TOKENIZER, CODEBOOK), layout, TOKENIZER).history_codes.tolist()
        == ex.history_codes.tolist()
    )


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: setattr(s, "tokenizer_version", "tok-test-v2"), sm.TOKENIZER_MISMATCH),
        (lambda s: s.target_tokens.append(1), sm.SHAPE_MISMATCH),
        (lambda s: s.history_tokens.__setitem__(0, 10_000), sm.TOKEN_RANGE),
        (lambda s: setattr(s, "event_id", ""), sm.INVALID_FIELD),
    ],
)
def test_bad_samples_are_rejected_with_a_reason(mutate, reason) -> None:
    ex = synthetic_examples(5)[-1]
    s = pb.TrainingSample.FromString(sm.sample_bytes(ex, TOKENIZER, CODEBOOK))
    mutate(s)
    with pytest.raises(sm.SampleRejected) as e:
        sm.decode_sample(s.SerializeToString(), tiny_config().layout, TOKENIZER)
    assert e.value.reason == reason
    with pytest.raises(sm.SampleRejected) as e:
        sm.decode_sample(b"\xff\xff", tiny_config().layout, TOKENIZER)
    assert e.value.reason == sm.DECODE_ERROR
