#!/usr/bin/env python3
"""Builds the `fraud` example: synthetic card transactions, per-user aggregates (the feature
store's rows), a gradient-boosted model trained on the encoded features and exported to ONNX,
the graph's config, and sample requests with the answers a correct graph gives.

  .venv/bin/python examples/make_fraud.py     # writes examples/fraud.toml and examples/fraud/

The encoding is done here with numpy and scikit-learn (StandardScaler/MinMaxScaler formulas,
np.log1p, np.clip, np.digitize, OneHotEncoder, FeatureHasher); Sluice's encode step must give
the same vectors, and the tests compare them. Expected probabilities come from onnxruntime on
those vectors. Everything is seeded: rerunning gives the same files.
"""
import csv
import json
import os

import numpy as np
import onnxruntime as ort
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.feature_extraction import FeatureHasher
from sklearn.preprocessing import OneHotEncoder
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fraud")
RNG = np.random.default_rng(7)

COUNTRIES = ["US", "GB", "DE", "FR", "NG", "BR"]
MERCHANTS = ["grocery", "fuel", "travel", "electronics", "gambling", "restaurant", "fashion", "crypto"]
DEVICES = [f"dev-{i:04d}" for i in range(400)]
HOUR_EDGES = [6, 12, 18]
USERS = 1000
MERCHANT_COUNT = 200


def users():
    rows = []
    for i in range(USERS):
        rows.append({
            "user_id": f"u{i:05d}",
            "txn_count_7d": float(RNG.poisson(6)),
            "avg_amount_30d": float(np.round(RNG.lognormal(3.8, 0.8), 2)),
            "chargebacks_90d": int(RNG.poisson(0.15)),
            "account_age_days": int(RNG.integers(1, 3650)),
        })
    return rows


def merchants():
    rows = []
    for i in range(MERCHANT_COUNT):
        category = MERCHANTS[RNG.integers(len(MERCHANTS))]
        base = 0.6 if category in ("gambling", "crypto") else 0.2
        rows.append({
            "merchant_id": f"m{i:04d}",
            "category": category,
            "risk": float(np.float32(np.clip(RNG.normal(base, 0.15), 0, 1))),
            "chargeback_rate": float(np.round(RNG.beta(1, 40), 5)),
        })
    return rows


def transactions(n, people, shops):
    rows = []
    for _ in range(n):
        u = people[RNG.integers(len(people))]
        m = shops[RNG.integers(len(shops))]
        rows.append({
            "user_id": u["user_id"],
            "merchant_id": m["merchant_id"],
            "amount": float(np.float32(np.round(RNG.lognormal(3.8, 1.2), 2))),
            "merchant_category": m["category"],
            "hour": int(RNG.integers(0, 24)),
            "country": COUNTRIES[RNG.choice(len(COUNTRIES), p=[.5, .15, .1, .1, .08, .07])],
            "device": DEVICES[RNG.integers(len(DEVICES))],
        })
    return rows


def label(t, u, m):
    z = (-4.6 + 2.0 * m["risk"] + 25 * m["chargeback_rate"] + 0.9 * np.log1p(t["amount"]) / 3 + 1.4 * (t["country"] in ("NG", "BR"))
         + 1.2 * (t["merchant_category"] in ("gambling", "crypto")) + 0.9 * (t["hour"] < 6)
         + 0.8 * u["chargebacks_90d"] - 0.4 * np.log1p(u["account_age_days"]) / 3
         + 0.6 * (t["amount"] > 4 * max(u["avg_amount_30d"], 1.0)))
    return int(RNG.random() < 1 / (1 + np.exp(-z)))


USER_FEATURES = ["txn_count_7d", "avg_amount_30d", "chargebacks_90d", "account_age_days"]
MERCHANT_DEFAULTS = {"risk": 0.5, "chargeback_rate": 0.0}
DEFAULTS = {"txn_count_7d": 0.0, "avg_amount_30d": 0.0, "chargebacks_90d": 0, "account_age_days": 0}


def encoder_stats(txns, feats):
    la = np.log1p(np.clip(np.array([t["amount"] for t in txns], np.float64), 0, 20000))
    lc = np.log1p(np.array([f["txn_count_7d"] for f in feats], np.float64))
    lv = np.log1p(np.array([f["avg_amount_30d"] for f in feats], np.float64))
    r = lambda x: float(np.round(x, 4))
    return {"amount": (r(la.mean()), r(la.std())), "count": (r(lc.mean()), r(lc.std())),
            "avg": (r(lv.mean()), r(lv.std()))}


def encode(txns, feats, shops, stats):
    """The reference encoding, column group by column group, as the graph's encode step does."""
    f64 = lambda k, rows: np.array([r[k] for r in rows], np.float32).astype(np.float64)
    cols = []
    m, s = stats["amount"]
    cols.append(((np.log1p(np.clip(f64("amount", txns), 0, 20000)) - m) / s)[:, None])
    hour_bucket = np.digitize(f64("hour", txns), HOUR_EDGES).astype(int).astype(str)
    cols.append(OneHotEncoder(categories=[["0", "1", "2", "3"]], handle_unknown="ignore")
                .fit_transform(hour_bucket[:, None]).toarray())
    cols.append(OneHotEncoder(categories=[COUNTRIES], handle_unknown="ignore")
                .fit_transform(np.array([[t["country"]] for t in txns])).toarray())
    cols.append(OneHotEncoder(categories=[MERCHANTS], handle_unknown="ignore")
                .fit_transform(np.array([[t["merchant_category"]] for t in txns])).toarray())
    cols.append(FeatureHasher(n_features=8, input_type="string")
                .transform([[t["device"]] for t in txns]).toarray())
    m, s = stats["count"]
    cols.append(((np.log1p(f64("txn_count_7d", feats)) - m) / s)[:, None])
    m, s = stats["avg"]
    cols.append(((np.log1p(f64("avg_amount_30d", feats)) - m) / s)[:, None])
    cols.append(np.clip(f64("chargebacks_90d", feats), 0, 5)[:, None])
    cols.append(((f64("account_age_days", feats) - 0) / (3650 - 0))[:, None])
    cols.append(np.clip(f64("risk", shops), 0, 1)[:, None])
    cols.append(np.log1p(np.array([m["chargeback_rate"] for m in shops], np.float64) * 100)[:, None])
    return np.hstack(cols).astype(np.float32)


CONFIG = """# Sluice example: card-fraud scoring as one graph of business-logic steps around a model.
#   validate the transaction -> look up the user's aggregates in Redis -> encode everything into
#   one feature vector -> gradient-boosted model (ONNX) -> approve / review / decline.
# Generated by examples/make_fraud.py (encoding statistics come from its training data).
# Run with: deploy/up.sh examples/fraud.toml (or deploy/up.sh: the demo stack includes it).
# `sluice up` loads the data the graph looks up when it starts (below); Feast writes the same
# users' rows with .venv-feast/bin/python examples/fraud/feast_materialize.py.

# The merchant table into PostgreSQL (upserted), and the users' aggregates into Redis in Feast's
# layout (what `feast materialize` writes: `sluice features load` in Feast's format).
[[local.seed]]
sql = "fraud/merchants.sql"
postgres = "postgres://postgres@127.0.0.1:5432/postgres"

[[local.seed]]
features = "fraud/user_features.csv"
step = "fraud.user_features"

[kafka]
brokers = "127.0.0.1:9092"

[redis]
url = "redis://127.0.0.1:6379"

[gateway]
listen = "127.0.0.1:8000"

[models.fraud-gbm]
onnx = "fraud/fraud.onnx"
max_batch_size = 64
max_delay = "0ms"
inputs = [{{ name = "input", datatype = "FP32", shape = [-1, {width}] }}]
outputs = [
  {{ name = "label", datatype = "INT64", shape = [-1] }},
  {{ name = "probabilities", datatype = "FP32", shape = [-1, 2] }},
]

[graphs.fraud]
inputs = [
  {{ name = "user_id", datatype = "BYTES", shape = [-1] }},
  {{ name = "merchant_id", datatype = "BYTES", shape = [-1] }},
  {{ name = "amount", datatype = "FP32", shape = [-1] }},
  {{ name = "merchant_category", datatype = "BYTES", shape = [-1] }},
  {{ name = "hour", datatype = "INT64", shape = [-1] }},
  {{ name = "country", datatype = "BYTES", shape = [-1] }},
  {{ name = "device", datatype = "BYTES", shape = [-1] }},
]

[[graphs.fraud.steps]]
name = "check"
inputs = {{ user_id = "request.user_id", merchant_id = "request.merchant_id", amount = "request.amount", merchant_category = "request.merchant_category", hour = "request.hour", country = "request.country", device = "request.device" }}
validate = [
  {{ input = "user_id", rule = "regex", pattern = "^u[0-9]{{5}}$" }},
  {{ input = "merchant_id", rule = "regex", pattern = "^m[0-9]{{4}}$" }},
  {{ input = "amount", rule = "finite" }},
  {{ input = "amount", rule = "range", min = 0, max = 1000000 }},
  {{ input = "hour", rule = "range", min = 0, max = 23 }},
  {{ input = "country", rule = "length", min = 2, max = 2 }},
  {{ input = "merchant_category", rule = "one_of", values = {merchants} }},
  {{ input = "device", rule = "required" }},
]

# fused = true: the step runs in the worker of the step before it, in process, with no broker
# hop in between; the edge into the model stays a topic, so the model scales on its own.
# The merchant's row from PostgreSQL (examples/fraud/merchants.sql), one query per batch.
[[graphs.fraud.steps]]
name = "merchant"
fused = true
inputs = {{ merchant_id = "check.merchant_id" }}
[graphs.fraud.steps.postgres]
url = "postgres://postgres@127.0.0.1:5432/postgres"
query = "SELECT merchant_id, risk, chargeback_rate FROM fraud_merchants WHERE merchant_id = ANY($1)"
key = "merchant_id"
timeout = "200ms"
columns = [
  {{ name = "risk", datatype = "FP32", default = 0.5 }},
  {{ name = "chargeback_rate", datatype = "FP64", default = 0 }},
]

[[graphs.fraud.steps]]
name = "user_features"
fused = true
after = "merchant"
inputs = {{ user_id = "check.user_id" }}
# What `feast materialize` wrote (examples/fraud/feature_repo), read as Feast's own server does.
[graphs.fraud.steps.features]
entity = "user_id"
layout = "feast"
project = "fraud"
join_key = "user_id"
timeout = "100ms"
features = [
  {{ view = "user_stats", name = "txn_count_7d", datatype = "FP32", default = 0 }},
  {{ view = "user_stats", name = "avg_amount_30d", datatype = "FP32", default = 0 }},
  {{ view = "user_stats", name = "chargebacks_90d", datatype = "INT64", default = 0 }},
  {{ view = "user_stats", name = "account_age_days", datatype = "INT64", default = 0 }},
]

[[graphs.fraud.steps]]
name = "encode"
fused = true
inputs = {{ amount = "check.amount", hour = "check.hour", country = "check.country", merchant_category = "check.merchant_category", device = "check.device", txn_count_7d = "user_features.txn_count_7d", avg_amount_30d = "user_features.avg_amount_30d", chargebacks_90d = "user_features.chargebacks_90d", account_age_days = "user_features.account_age_days", merchant_risk = "merchant.risk", merchant_chargeback_rate = "merchant.chargeback_rate" }}
output = "input"
encode = [
  {{ input = "amount", ops = [{{ op = "clip", min = 0, max = 20000 }}, {{ op = "log1p" }}, {{ op = "standardize", mean = {am}, std = {asd} }}] }},
  {{ input = "hour", ops = [{{ op = "bucketize", edges = {edges} }}, {{ op = "one_hot", vocabulary = ["0", "1", "2", "3"] }}] }},
  {{ input = "country", ops = [{{ op = "one_hot", vocabulary = {countries} }}] }},
  {{ input = "merchant_category", ops = [{{ op = "one_hot", vocabulary = {merchants} }}] }},
  {{ input = "device", ops = [{{ op = "hash", buckets = 8 }}] }},
  {{ input = "txn_count_7d", ops = [{{ op = "log1p" }}, {{ op = "standardize", mean = {cm}, std = {csd} }}] }},
  {{ input = "avg_amount_30d", ops = [{{ op = "log1p" }}, {{ op = "standardize", mean = {vm}, std = {vsd} }}] }},
  {{ input = "chargebacks_90d", ops = [{{ op = "clip", min = 0, max = 5 }}] }},
  {{ input = "account_age_days", ops = [{{ op = "min_max", min = 0, max = 3650 }}] }},
  {{ input = "merchant_risk", ops = [{{ op = "clip", min = 0, max = 1 }}] }},
  {{ input = "merchant_chargeback_rate", ops = [{{ op = "standardize", mean = 0, std = 0.01 }}, {{ op = "log1p" }}] }},
]

[[graphs.fraud.steps]]
name = "model"
model = "fraud-gbm"
inputs = {{ input = "encode.input" }}

[[graphs.fraud.steps]]
name = "decision"
fused = true
inputs = {{ probabilities = "model.probabilities", amount = "check.amount" }}
[graphs.fraud.steps.decide]
otherwise = "approve"
keep = ["probabilities"]
rules = [
  {{ name = "high_risk", input = "probabilities", column = 1, op = ">=", value = 0.8, decision = "decline" }},
  {{ name = "elevated_risk", input = "probabilities", column = 1, op = ">=", value = 0.4, decision = "review" }},
  {{ name = "large_amount", input = "amount", op = ">", value = 10000, decision = "review" }},
]
"""


def decide(p1, amount):
    if np.float32(p1) >= np.float32(0.8):
        return "decline", "high_risk"
    if np.float32(p1) >= np.float32(0.4):
        return "review", "elevated_risk"
    if amount > 10000:
        return "review", "large_amount"
    return "approve", "otherwise"


def main():
    os.makedirs(OUT, exist_ok=True)
    people = users()
    by_id = {u["user_id"]: u for u in people}
    shops = merchants()
    shop_by_id = {m["merchant_id"]: m for m in shops}
    txns = transactions(20000, people, shops)
    y = np.array([label(t, by_id[t["user_id"]], shop_by_id[t["merchant_id"]]) for t in txns])
    feats = [by_id[t["user_id"]] for t in txns]
    stats = encoder_stats(txns, feats)
    x = encode(txns, feats, [shop_by_id[t["merchant_id"]] for t in txns], stats)
    model = GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=0).fit(x, y)
    onx = convert_sklearn(model, initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
                          options={id(model): {"zipmap": False}}, target_opset=17)
    for node in onx.graph.node:
        node.output[:] = [{"output_label": "label", "output_probability": "probabilities"}.get(o, o)
                          for o in node.output]
    for o in onx.graph.output:
        o.name = {"output_label": "label", "output_probability": "probabilities"}.get(o.name, o.name)
    path = os.path.join(OUT, "fraud.onnx")
    with open(path, "wb") as f:
        f.write(onx.SerializeToString())
    with open(os.path.join(OUT, "user_features.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["user_id"] + USER_FEATURES)
        w.writeheader()
        for u in people:
            w.writerow(u)
    with open(os.path.join(OUT, "merchants.sql"), "w") as f:
        f.write("-- The fraud example's merchant table (generated by examples/make_fraud.py).\n"
                "-- psql -h 127.0.0.1 -U postgres -f examples/fraud/merchants.sql\n"
                "-- Idempotent (sluice up loads it at every start): rows are upserted, never dropped.\n"
                "CREATE TABLE IF NOT EXISTS fraud_merchants (merchant_id text PRIMARY KEY,\n"
                "  category text NOT NULL,\n"
                "  risk real NOT NULL, chargeback_rate double precision NOT NULL);\n"
                "INSERT INTO fraud_merchants VALUES\n")
        f.write(",\n".join(f"  ('{m['merchant_id']}', '{m['category']}', {m['risk']!r}, {m['chargeback_rate']!r})"
                            for m in shops) + "\n"
                "ON CONFLICT (merchant_id) DO UPDATE SET category = EXCLUDED.category,\n"
                "  risk = EXCLUDED.risk, chargeback_rate = EXCLUDED.chargeback_rate;\n")
    j = lambda v: json.dumps(v)
    with open(os.path.join(HERE, "fraud.toml"), "w") as f:
        f.write(CONFIG.format(width=x.shape[1], merchants=j(MERCHANTS), countries=j(COUNTRIES),
                              edges=j(HOUR_EDGES), am=stats["amount"][0], asd=stats["amount"][1],
                              cm=stats["count"][0], csd=stats["count"][1], vm=stats["avg"][0],
                              vsd=stats["avg"][1]))
    # Samples: fresh transactions, some from users the feature store does not know (defaults).
    sample = transactions(40, people, shops)
    for k, t in enumerate(sample[:6]):
        t["user_id"] = f"u9{k:04d}"
    for k, t in enumerate(sample[4:8]):  # merchants the database does not know (defaults)
        t["merchant_id"] = f"m9{k:03d}"
    for t in sample[6:14]:  # risky ones, so every decision shows up
        t.update(country="NG", merchant_category="crypto", hour=3)
        t["amount"] = float(np.float32(t["amount"] * 20))
    for t in sample[14:16]:
        t["amount"] = 15000.0
    sfeats = [by_id.get(t["user_id"], DEFAULTS) for t in sample]
    sshops = [shop_by_id.get(t["merchant_id"], MERCHANT_DEFAULTS) for t in sample]
    sx = encode(sample, sfeats, sshops, stats)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    labels, probs = sess.run(["label", "probabilities"], {"input": sx})
    decisions = [decide(p[1], t["amount"]) for p, t in zip(probs, sample)]
    json.dump({
        "requests": sample,
        "expected": {"features": sx.tolist(), "label": labels.tolist(),
                     "probabilities": probs.tolist(), "decision": [d for d, _ in decisions],
                     "rule": [r for _, r in decisions]},
        "unknown_users": [t["user_id"] for t in sample[:6]],
        "unknown_merchants": [t["merchant_id"] for t in sample[4:8]],
    }, open(os.path.join(OUT, "samples.json"), "w"), indent=1)
    # The request `sluice up` prints for the graph: one approved and one declined transaction.
    pick = [[d for d, _ in decisions].index(k) for k in ("approve", "decline")]
    rows = [sample[i] for i in pick]
    col = lambda k: [r[k] for r in rows]
    request = {"inputs": [
        {"name": "user_id", "datatype": "BYTES", "shape": [2], "data": col("user_id")},
        {"name": "merchant_id", "datatype": "BYTES", "shape": [2], "data": col("merchant_id")},
        {"name": "amount", "datatype": "FP32", "shape": [2], "data": col("amount")},
        {"name": "merchant_category", "datatype": "BYTES", "shape": [2], "data": col("merchant_category")},
        {"name": "hour", "datatype": "INT64", "shape": [2], "data": col("hour")},
        {"name": "country", "datatype": "BYTES", "shape": [2], "data": col("country")},
        {"name": "device", "datatype": "BYTES", "shape": [2], "data": col("device")},
    ]}
    with open(os.path.join(HERE, "requests", "fraud.json"), "w") as f:
        json.dump(request, f)
        f.write("\n")
    acc = (model.predict(x) == y).mean()
    print(f"fraud: {len(txns)} transactions, {y.mean():.1%} fraud, train accuracy {acc:.3f}, "
          f"{x.shape[1]} features; decisions {dict(zip(*np.unique([d for d, _ in decisions], return_counts=True)))}")


if __name__ == "__main__":
    main()
