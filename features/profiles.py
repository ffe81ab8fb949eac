"""User-profile tokens: the P tokens that open every HMAT stream (docs/method.md §3 "Token stream").

Each profile column becomes one token, in column order, so P = number of columns and the
j coordinate of a profile token names its column. Every column owns a contiguous block
of ids in the profile vocabulary whose first id means "unknown" (a missing value, or a
value never seen when the vocabulary was built): a serving-time user with a new
occupation still gets a well-formed stream instead of an error.

``age`` is bucketed with MovieLens-1M's own groups (under 18, 18-24, 25-34, 35-44, 45-49,
50-55, 56+): ML-100K ships raw ages, and one token per year would spread a few hundred
users over ~60 rarely-seen ids. Any other column is categorical (its values as strings).

The vocabulary is fitted on the users table, not on interactions, so it cannot leak the
test period; it is saved with every checkpoint (``to_dict``) so that evaluation and
serving map users exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

AGE_COLUMN = "age"
# MovieLens-1M age groups, as lower edges of buckets 1..6 (bucket 0: under 18).
AGE_EDGES = (18, 25, 35, 45, 50, 56)
UNKNOWN = 0  # the first id of every column's block


@dataclass(frozen=True)
class ProfileVocab:
    """Column -> block of profile ids; ``values[c]`` lists the known values of a categorical column."""

    columns: tuple[str, ...]
    values: dict[str, tuple[str, ...]]  # categorical columns only; age uses AGE_EDGES

    @classmethod
    def fit(cls, users: pd.DataFrame, columns: list[str] | None = None) -> ProfileVocab:
        """Vocabulary of ``columns`` (default: every column but ``external_id``), values sorted."""
        cols = [c for c in users.columns if c != "external_id"] if columns is None else list(columns)
        missing = [c for c in cols if c not in users.columns]
        if missing:
            raise ValueError(f"profile columns {missing} are not in the users table {list(users.columns)}")
        values = {}
        for c in cols:
            if c == AGE_COLUMN and pd.api.types.is_numeric_dtype(users[c]):
                continue
            values[c] = tuple(sorted({str(v) for v in users[c].dropna()}))
        return cls(tuple(cols), values)

    def block_size(self, column: str) -> int:
        """Ids owned by ``column``: its known values (or age buckets) plus the unknown id."""
        if column in self.values:
            return 1 + len(self.values[column])
        return 1 + len(AGE_EDGES) + 1

    @property
    def offsets(self) -> dict[str, int]:
        out, start = {}, 0
        for c in self.columns:
            out[c] = start
            start += self.block_size(c)
        return out

    @property
    def size(self) -> int:
        """Profile vocabulary size: what ``HMATConfig.profile_vocab_size`` must be at least."""
        return sum(self.block_size(c) for c in self.columns)

    @property
    def n_tokens(self) -> int:
        """P: tokens per user (one per column)."""
        return len(self.columns)

    def _column_ids(self, column: str, raw: pd.Series) -> np.ndarray:
        """Local ids (0 = unknown) of one column's values."""
        if column not in self.values:
            age = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
            ids = np.searchsorted(np.asarray(AGE_EDGES, dtype=np.float64), age, side="right") + 1
            return np.where(np.isnan(age), UNKNOWN, ids).astype(np.int64)
        lookup = {v: k + 1 for k, v in enumerate(self.values[column])}
        return np.array([UNKNOWN if pd.isna(v) else lookup.get(str(v), UNKNOWN) for v in raw], dtype=np.int64)

    def encode(self, users: pd.DataFrame) -> np.ndarray:
        """(U, P) int64 profile ids, row r for ``users.iloc[r]``, in [0, size)."""
        offsets = self.offsets
        cols = [offsets[c] + self._column_ids(c, users[c]) for c in self.columns]
        return np.stack(cols, axis=1) if cols else np.zeros((len(users), 0), dtype=np.int64)

    def to_dict(self) -> dict:
        return {"columns": list(self.columns), "values": {c: list(v) for c, v in self.values.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> ProfileVocab:
        return cls(tuple(d["columns"]), {c: tuple(v) for c, v in d["values"].items()})
