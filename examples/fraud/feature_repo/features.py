"""The fraud example's feature definitions: one entity (user_id) and one feature view of
per-user aggregates, read from data/user_stats.parquet (written by ../feast_materialize.py)."""
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)

user_stats_source = FileSource(
    path="data/user_stats.parquet",
    timestamp_field="event_timestamp",
)

user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="txn_count_7d", dtype=Float32),
        Field(name="avg_amount_30d", dtype=Float32),
        Field(name="chargebacks_90d", dtype=Int64),
        Field(name="account_age_days", dtype=Int64),
    ],
    source=user_stats_source,
    online=True,
)
