#!/usr/bin/env python3
"""Materializes the fraud example's user aggregates into Redis with Feast itself.

  FEAST_REDIS=localhost:6379 .venv-feast/bin/python examples/fraud/feast_materialize.py
      writes data/user_stats.parquet from user_features.csv, runs `feast apply` and
      `feast materialize` (Feast's own Redis writer: what Sluice's feature step reads)

  ... feast_materialize.py --read u00001 u00002
      prints what Feast's get_online_features returns for those users (JSON), e.g. to check
      rows that `sluice features load --format feast` wrote.
"""
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "feature_repo")
FEATURES = ["txn_count_7d", "avg_amount_30d", "chargebacks_90d", "account_age_days"]
os.environ.setdefault("FEAST_REDIS", "localhost:6379")


def store():
    from feast import FeatureStore
    return FeatureStore(repo_path=REPO)


def materialize():
    import pandas as pd
    df = pd.read_csv(os.path.join(HERE, "user_features.csv"))
    df["txn_count_7d"] = df["txn_count_7d"].astype("float32")
    df["avg_amount_30d"] = df["avg_amount_30d"].astype("float32")
    df["event_timestamp"] = datetime.now(timezone.utc) - timedelta(minutes=1)
    os.makedirs(os.path.join(REPO, "data"), exist_ok=True)
    df.to_parquet(os.path.join(REPO, "data", "user_stats.parquet"), index=False)
    feast = os.path.join(os.path.dirname(sys.executable), "feast")
    subprocess.run([feast, "apply"], cwd=REPO, check=True)
    end = datetime.now(timezone.utc)
    subprocess.run([feast, "materialize", (end - timedelta(days=1)).isoformat(), end.isoformat()],
                   cwd=REPO, check=True)
    print(f"materialized {len(df)} users into Redis {os.environ['FEAST_REDIS']}")


def read(users):
    resp = store().get_online_features(
        features=[f"user_stats:{f}" for f in FEATURES],
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()
    print(json.dumps(resp))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--read":
        read(sys.argv[2:])
    else:
        materialize()
