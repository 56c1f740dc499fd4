#!/usr/bin/env bash
# Reproducible benchmark: for each model, a fresh local stack (`sluice up --models M`, a new
# Kafka log), then `sluice bench` (transport floor, in-process compute, HTTP load).
# A fresh stack per model keeps the measurements apart. usage: deploy/bench.sh [MODEL_OR_GRAPH...]
# (default: mlp heavy digits-pipeline digits-ensemble). SLUICE_BIN=path runs another sluice
# binary (to compare builds in one run); otherwise the release build of this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release --quiet --bin sluice
fi
BIN=${SLUICE_BIN:-target/release/sluice}
CONFIG=${SLUICE_BENCH_CONFIG:-examples/digits.toml}
DURATION=${SLUICE_BENCH_DURATION:-10s}
for model in "${@:-mlp heavy digits-pipeline digits-ensemble}"; do
  for m in $model; do
    SLUICE__LOCAL__KAFKA_DIR="$(mktemp -d)/kafka" "$BIN" --config "$CONFIG" up --models "$m" >/tmp/sluice-bench-up.out 2>/tmp/sluice-bench-up.log &
    up=$!
    # `up` prints its banner once the gateway and every worker are ready.
    for _ in $(seq 1 300); do
      grep -q "Sluice is up" /tmp/sluice-bench-up.out 2>/dev/null && break
      sleep 0.2
    done
    "$BIN" --config "$CONFIG" bench --model "$m" --concurrency 1,32 --duration "$DURATION" 2>/dev/null
    kill -TERM "$up"
    wait "$up" || true
  done
done
