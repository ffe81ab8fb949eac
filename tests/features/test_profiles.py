"""Profile tokens (features/profiles.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.profiles import AGE_EDGES, ProfileVocab


def users() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "external_id": ["1", "2", "3", "4"],
            "age": [7, 18, 34, 73],
            "gender": ["M", "F", "M", None],
            "occupation": ["writer", "student", "writer", "none"],
        }
    )


def test_movielens_profile_mapping() -> None:
    vocab = ProfileVocab.fit(users())
    assert vocab.columns == ("age", "gender", "occupation")
    assert vocab.values == {"gender": ("F", "M"), "occupation": ("none", "student", "writer")}
    # Blocks: age 1 unknown + 7 buckets = 8, gender 1 + 2 = 3, occupation 1 + 3 = 4.
    assert vocab.offsets == {"age": 0, "gender": 8, "occupation": 11} and vocab.size == 15
    ids = vocab.encode(users())
    # Ages 7, 18, 34, 73: buckets under-18 (1), 18-24 (2), 25-34 (3), 56+ (7).
    assert ids[:, 0].tolist() == [1, 2, 3, 1 + len(AGE_EDGES)]
    assert ids[:, 1].tolist() == [8 + 2, 8 + 1, 8 + 2, 8 + 0]  # a missing gender is the unknown id
    assert ids[:, 2].tolist() == [11 + 3, 11 + 2, 11 + 3, 11 + 1]
    assert ids.dtype == np.int64 and ids.shape == (4, vocab.n_tokens)


def test_unseen_values_map_to_unknown_and_vocab_round_trips() -> None:
    vocab = ProfileVocab.fit(users())
    new = pd.DataFrame({"external_id": ["9"], "age": [float("nan")], "gender": ["X"], "occupation": ["pilot"]})
    assert vocab.encode(new).tolist() == [[0, 8, 11]]
    again = ProfileVocab.from_dict(vocab.to_dict())
    assert again == vocab and np.array_equal(again.encode(users()), vocab.encode(users()))


def test_column_selection() -> None:
    vocab = ProfileVocab.fit(users(), columns=["occupation"])
    assert vocab.encode(users()).tolist() == [[3], [2], [3], [1]]
