"""Reads through Feast's ``get_online_features``: the reference read path the direct reads must equal.

The callers pass an open ``FeatureStore`` (``open_feature_store``), so this module never
imports feast itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from features import encoding as enc
from features.store.records import UserStream

if TYPE_CHECKING:
    from feast import FeatureStore


def feast_read_streams(store: FeatureStore, user_ids: Sequence[int], n_codes: int) -> list[UserStream | None]:
    """Users' streams through Feast's ``get_online_features`` (the reference read path)."""
    refs = [f"{enc.USER_STREAM_FV}:{f}" for f in enc.STREAM_FEATURES]
    got = store.get_online_features(features=refs, entity_rows=[{enc.USER_ID_KEY: int(u)} for u in user_ids]).to_dict()
    out: list[UserStream | None] = []
    for i, u in enumerate(user_ids):
        eids = got["event_ids"][i]
        if eids is None:
            out.append(None)
            continue
        out.append(
            UserStream(
                user_id=int(u),
                tokens=np.asarray(got["sid_tokens"][i] or [], np.int64).reshape(-1, n_codes),
                actions=np.asarray(got["actions"][i] or [], np.int64),
                event_ids=list(eids),
                event_times_ms=np.asarray(got["event_times_ms"][i] or [], np.int64),
            )
        )
    return out


def feast_read_item_sids(store: FeatureStore, item_ids: Sequence[int]) -> Mapping[int, list[int] | None]:
    """Items' semantic IDs through Feast (None for an unknown item)."""
    got = store.get_online_features(
        features=[f"{enc.ITEM_SID_FV}:sid_tokens"], entity_rows=[{enc.ITEM_ID_KEY: int(i)} for i in item_ids]
    ).to_dict()
    return {int(i): got["sid_tokens"][k] for k, i in enumerate(item_ids)}
