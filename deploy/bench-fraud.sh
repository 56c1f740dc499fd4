#!/usr/bin/env bash
# The fraud graph's benchmark, each figure against a baseline measured in the same run, each
# graph on a fresh local stack (`sluice up --models G`, a new Kafka log, the release build):
#   fraud           the example as shipped: both lookups, encode and decision fused (2 hops)
#   fraud-unfused   the same steps, each behind its own topic (6 broker hops)
#   fraud-direct    the same graph with the user features passed in the request (no lookup)
# then the feature step's Redis command counts. usage: deploy/bench-fraud.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
cargo build --release --quiet --bin sluice
BIN=target/release/sluice
DURATION=${1:-10s}
OUT=target/bench-fraud
mkdir -p "$OUT"
.venv/bin/python - "$OUT" <<'PY'
import csv, json, os, re, sys
out = sys.argv[1]
text = open("examples/fraud.toml").read()
text = text.replace('onnx = "', 'onnx = "' + os.path.abspath("examples") + "/")
graph = text[text.index("[graphs.fraud]"):]
unfused = graph.replace("graphs.fraud", "graphs.fraud-unfused").replace("fused = true\n", "")
# fraud-direct: the four user features are request inputs; no lookup step.
direct = graph.replace("graphs.fraud", "graphs.fraud-direct")
start = direct.index('[[graphs.fraud-direct.steps]]\nname = "user_features"')
end = direct.index('[[graphs.fraud-direct.steps]]\nname = "encode"')
direct = direct[:start] + direct[end:]
feats = ["txn_count_7d", "avg_amount_30d", "chargebacks_90d", "account_age_days"]
types = {"txn_count_7d": "FP32", "avg_amount_30d": "FP32", "chargebacks_90d": "INT64", "account_age_days": "INT64"}
for f in feats:
    direct = direct.replace(f'{f} = "user_features.{f}"', f'{f} = "check.{f}"')
extra_inputs = "".join(f'  {{ name = "{f}", datatype = "{types[f]}", shape = [-1] }},\n' for f in feats)
direct = direct.replace('  { name = "device", datatype = "BYTES", shape = [-1] },\n',
                        '  { name = "device", datatype = "BYTES", shape = [-1] },\n' + extra_inputs, 1)
direct = direct.replace('device = "request.device" }', 'device = "request.device", '
                        + ", ".join(f'{f} = "request.{f}"' for f in feats) + " }", 1)
open(f"{out}/fraud-bench.toml", "w").write(text + "\n" + unfused + "\n" + direct)
body = json.load(open("examples/requests/fraud.json"))
json.dump(body, open(f"{out}/fraud.json", "w"))
json.dump(body, open(f"{out}/fraud-unfused.json", "w"))
users = {r["user_id"]: r for r in csv.DictReader(open("examples/fraud/user_features.csv"))}
ids = body["inputs"][0]["data"]
for f in feats:
    conv = float if types[f] == "FP32" else lambda v: int(float(v))
    data = [conv(users[u][f]) if u in users else 0 for u in ids]
    body["inputs"].append({"name": f, "datatype": types[f], "shape": [len(ids)], "data": data})
json.dump(body, open(f"{out}/fraud-direct.json", "w"))
PY
CONFIG=$OUT/fraud-bench.toml
# The merchant table the graphs read (the example's own, in the default database).
psql -h 127.0.0.1 -U postgres -q -f examples/fraud/merchants.sql 2>/dev/null
for g in fraud fraud-unfused fraud-direct; do
  SLUICE__LOCAL__KAFKA_DIR="$OUT/kafka-$g" "$BIN" --config "$CONFIG" up --models "$g" >"$OUT/up.out" 2>"$OUT/up.log" &
  up=$!
  for _ in $(seq 1 300); do
    grep -q "Sluice is up" "$OUT/up.out" 2>/dev/null && break
    sleep 0.2
  done
  "$BIN" --config "$CONFIG" features load examples/fraud/user_features.csv --step fraud.user_features >/dev/null 2>&1
  before=$(redis-cli INFO commandstats | grep -o 'cmdstat_hmget:calls=[0-9]*' | cut -d= -f2 || true)
  echo "== $g"
  "$BIN" --config "$CONFIG" bench --model "$g" --input "$OUT/$g.json" --concurrency 1,32 \
    --duration "$DURATION" --skip-compute --skip-transport 2>/dev/null
  after=$(redis-cli INFO commandstats | grep -o 'cmdstat_hmget:calls=[0-9]*' | cut -d= -f2 || true)
  echo "   Redis HMGET calls during the run: $(( ${after:-0} - ${before:-0} ))"
  kill -TERM "$up"
  wait "$up" || true
done
