#!/usr/bin/env bash
# Hot-swap under load on the stack users start (`sluice up --models mlp`, a fresh Kafka
# log, the release build): `sluice bench` at concurrency 32 on mlp, first with no swap (the
# baseline), then while a new version is pushed every 2 s (alternately logreg's file and mlp's),
# each push waiting until the worker serves it, then with no swap again (the two baselines
# bracket the swap run). Compare the failed requests and p99.
# usage: deploy/bench-hot-swap.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
cargo build --release --quiet --bin sluice
BIN=target/release/sluice
CONFIG=examples/digits.toml
DURATION=${1:-12s}
OUT=target/bench-hot-swap
mkdir -p "$OUT"
export SLUICE__MODEL_STORE="$PWD/$OUT/store"
export SLUICE__LOCAL__KAFKA_DIR="$PWD/$OUT/kafka"
"$BIN" --config "$CONFIG" up --models mlp >"$OUT/up.out" 2>"$OUT/up.log" &
UP=$!
trap 'kill -INT $UP 2>/dev/null || true; wait $UP 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "Sluice is up" "$OUT/up.out" 2>/dev/null && break
  sleep 0.2
done
bench() {
  "$BIN" --config "$CONFIG" bench --model mlp --concurrency 32 --duration "$DURATION" \
    --skip-compute --skip-transport 2>/dev/null
}
echo "== no swap (baseline)"
bench
echo "== a push every 2 s during the run"
(
  sleep 3
  v=100
  for _ in 1 2 3; do
    for f in logreg mlp; do
      v=$((v + 1))
      "$BIN" --config "$CONFIG" models push mlp "examples/models/$f.onnx" --version "$v" 2>/dev/null \
        | sed -n 2p
      sleep 2
    done
  done
) &
PUSHER=$!
bench
wait $PUSHER || true
echo "== no swap again (baseline after)"
bench
