#!/usr/bin/env bash
# Online learning on the stack users start (`sluice up --config examples/sea.toml`, a fresh
# Kafka log, the release build):
#   1. the SEA drift replay through the gateway with feedback (examples/sea_drift.py): accuracy
#      per window of the online learner and of its frozen copy, side by side, and a PNG plot;
#   2. on a fresh stack, the feedback-to-weights lag at a sustained feedback rate, the direct
#      Kafka way (examples/learning_lag.py).
# usage: deploy/bench-learning.sh [EVENTS] [FEEDBACK_RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
cargo build --release --quiet --bin sluice
BIN=target/release/sluice
EVENTS=${1:-10000}
RATE=${2:-2000}
OUT=target/bench-learning
mkdir -p "$OUT"

up() {
  # A fresh stack (its checkpoints in a Redis database of its own: no earlier run's state).
  redis-cli -n 0 --scan --pattern 'sluice:learner:*' | xargs -r redis-cli -n 0 del >/dev/null
  SLUICE__LOCAL__KAFKA_DIR="$OUT/kafka-$RANDOM" "$BIN" --config examples/sea.toml up "$@" >"$OUT/up.out" 2>"$OUT/up.log" &
  UP=$!
  for _ in $(seq 1 300); do
    grep -q "Sluice is up" "$OUT/up.out" 2>/dev/null && return
    sleep 0.2
  done
  echo "the stack did not come up; see $OUT/up.log" >&2
  exit 1
}
down() {
  kill -INT "$UP" 2>/dev/null || true
  wait "$UP" 2>/dev/null || true
}
trap down EXIT

echo "== SEA drift: $EVENTS events, the change at $((EVENTS / 2)); accuracy of served answers"
up
.venv/bin/python examples/sea_drift.py --events "$EVENTS" --drift $((EVENTS / 2)) --plot "$OUT/sea_drift.png"
"$BIN" --config examples/sea.toml learn --model sea --status
down

echo "== feedback -> weights lag at $RATE feedback events/s (model sea, direct Kafka)"
up --models sea
.venv/bin/python examples/learning_lag.py --model sea --rate "$RATE" --seconds 10
"$BIN" --config examples/sea.toml learn --model sea --status
