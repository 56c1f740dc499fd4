#!/usr/bin/env bash
# Bandit routing on the stack users start (`sluice up --config examples/bandit.toml`, a fresh
# Kafka log, the release build): examples/bandit_replay.py through the gateway, rewards
# given back as feedback, for each policy in turn (Thompson sampling, ε-greedy, LinUCB): the
# bandit's accuracy and arm shares per window beside each fixed arm's, and its regret against
# the best fixed arm and against uniform choice; a PNG plot per policy.
# usage: deploy/bench-bandit.sh [EVENTS]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
cargo build --release --quiet --bin sluice
BIN=target/release/sluice
EVENTS=${1:-4000}
OUT=target/bench-bandit
mkdir -p "$OUT"

redis-cli -n 0 --scan --pattern 'sluice:learner:*' | xargs -r redis-cli -n 0 del >/dev/null
SLUICE__LOCAL__KAFKA_DIR="$OUT/kafka" "$BIN" --config examples/bandit.toml up >"$OUT/up.out" 2>"$OUT/up.log" &
UP=$!
trap 'kill -INT "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "Sluice is up" "$OUT/up.out" 2>/dev/null && break
  sleep 0.2
done
grep -q "Sluice is up" "$OUT/up.out" || { echo "the stack did not come up; see $OUT/up.log" >&2; exit 1; }

for graph in digits-bandit digits-egreedy digits-linucb; do
  echo "== $graph: $EVENTS requests, the cameras change at $((EVENTS / 2))"
  .venv/bin/python examples/bandit_replay.py --graph "$graph" --events "$EVENTS" --plot "$OUT/$graph.png"
  sleep 2 # the learner's next checkpoint
  "$BIN" --config examples/bandit.toml learn --model "$graph" --status
  echo
done
