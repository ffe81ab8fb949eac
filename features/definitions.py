"""The Feast feature repository: entities, push sources, feature views, feature services.

Declarative module-level objects with role suffixes (Feast's repo template). Importing
this module imports feast (~5 s), so only the jobs that talk to Feast import it; the
stream's write path and the serving fast path use ``features.encoding`` instead, which
writes the same bytes without feast.

Names here are a storage contract: the online-store keys and hash fields are derived from
the project, the feature-view names and the feature names (see ``features.encoding``), so
renaming a feature view orphans its stored data.

Lists are stored as epoch-int ``Array(Int64)`` rather than ``Array(UnixTimestamp)``
(docs/operations.md: the latter is slow to convert). TTL is zero (never expire): replayed
datasets carry old event times, and a user's stream is bounded by length, not by age.
"""

from __future__ import annotations

from datetime import timedelta

from feast import (
    Entity,
    FeatureService,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    ValueType,
)
from feast.types import Array, Int64, String

from features.encoding import (
    ITEM_ID_KEY,
    ITEM_SID_FV,
    USER_ID_KEY,
    USER_PROFILE_FV,
    USER_STREAM_FV,
)

user_entity = Entity(name="user", join_keys=[USER_ID_KEY], value_type=ValueType.INT64, description="an end user")
item_entity = Entity(name="item", join_keys=[ITEM_ID_KEY], value_type=ValueType.INT64, description="a catalogue item")

# A push-only view still needs a batch source; the file is never read (rows arrive by
# push or by the direct appends in features.store), so it need not exist.
user_stream_batch_source = FileSource(
    name="user_stream_batch_source",
    path="datasets/feast/user_stream.parquet",
    timestamp_field="event_timestamp",
)
user_stream_push_source = PushSource(name="user_stream_push_source", batch_source=user_stream_batch_source)

user_profile_batch_source = FileSource(
    name="user_profile_batch_source",
    path="datasets/feast/user_profile.parquet",
    timestamp_field="event_timestamp",
)
user_profile_push_source = PushSource(name="user_profile_push_source", batch_source=user_profile_batch_source)

item_sid_batch_source = FileSource(
    name="item_sid_batch_source",
    path="datasets/feast/item_sid.parquet",
    timestamp_field="event_timestamp",
)
item_sid_push_source = PushSource(name="item_sid_push_source", batch_source=item_sid_batch_source)

user_stream_fv = FeatureView(
    name=USER_STREAM_FV,
    entities=[user_entity],
    ttl=timedelta(0),
    schema=[
        # n_codes semantic-ID tokens per item, flattened, oldest item first.
        Field(name="sid_tokens", dtype=Array(Int64)),
        Field(name="actions", dtype=Array(Int64)),
        Field(name="event_ids", dtype=Array(String)),
        Field(name="event_times_ms", dtype=Array(Int64)),
    ],
    online=True,
    source=user_stream_push_source,
    description="a user's last T actions as semantic IDs (bounded, idempotent append)",
)

user_profile_fv = FeatureView(
    name=USER_PROFILE_FV,
    entities=[user_entity],
    ttl=timedelta(0),
    schema=[
        Field(name="n_actions", dtype=Int64),
        Field(name="last_action_ms", dtype=Int64),
    ],
    online=True,
    source=user_profile_push_source,
    description="running counters, updated in the same atomic step as the stream",
)

item_sid_fv = FeatureView(
    name=ITEM_SID_FV,
    entities=[item_entity],
    ttl=timedelta(0),
    schema=[
        Field(name="sid_tokens", dtype=Array(Int64)),
        Field(name="tokenizer_version", dtype=String),
    ],
    online=True,
    source=item_sid_push_source,
    description="an item's semantic IDs from the frozen tokenizer",
)

ranking_v1 = FeatureService(
    name="ranking_v1",
    features=[user_stream_fv, user_profile_fv, item_sid_fv],
    description="what Rank reads: the user's SID stream and the candidates' SIDs",
)

ALL_OBJECTS = [
    user_entity,
    item_entity,
    user_stream_push_source,
    user_profile_push_source,
    item_sid_push_source,
    user_stream_fv,
    user_profile_fv,
    item_sid_fv,
    ranking_v1,
]
