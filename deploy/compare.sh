#!/usr/bin/env bash
# Sluice as users start it against FastAPI + onnxruntime, same wrk load, same run.
# Starts the default stack (`sluice up` with examples/stack.toml, every example deployed, as
# deploy/up.sh does), loads mlp, digits-pipeline, digits-ensemble and heavy at concurrency 1 and
# 32 with wrk; stops it; then does the same against deploy/compare/fastapi_baseline.py under
# uvicorn with 1 and 2 worker processes. Prints one table of req/s, p50 and p99.
# usage: deploy/compare.sh [SECONDS_PER_RUN]   (default 10; SLUICE_BIN=path compares another build;
#        COMPARE_ALSO="SLUICE__WORKER__LOCAL_HOPS=false" also runs the stack with those settings,
#        as a column "sluice-also", in the same run; SLUICE_COMPARE_CONFIG=examples/digits.toml
#        serves the digits examples only, as before the demo stack grew)
set -euo pipefail
cd "$(dirname "$0")/.."
SLUICE_SETUP=stack deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
BENCH_VENV=.venv-bench
if [ ! -x "$BENCH_VENV/bin/uvicorn" ]; then
  python3 -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/pip" install -q fastapi uvicorn onnxruntime==1.31.1 numpy
fi
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release --quiet --bin sluice
fi
BIN=${SLUICE_BIN:-target/release/sluice}
SECS=${1:-10}
SERVABLES="mlp digits-pipeline digits-ensemble heavy"
OUT=$(mktemp -d)

# load NAME URL_BASE: one wrk run per servable and concurrency, results as "NAME servable c rps p50 p99".
load() {
  local name=$1 base=$2
  for s in $SERVABLES; do
    for c in 1 32; do
      local threads=$(( c < 2 ? 1 : 2 ))
      BODY="examples/requests/$s.json" wrk -t"$threads" -c"$c" -d"${SECS}s" --latency \
        -s deploy/compare/post.lua "$base/v2/models/$s/infer" > "$OUT/wrk.txt" 2>&1 || true
      local rps p50 p99 errs
      rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$OUT/wrk.txt")
      p50=$(awk '$1=="50%" {print $2}' "$OUT/wrk.txt")
      p99=$(awk '$1=="99%" {print $2}' "$OUT/wrk.txt")
      errs=$(awk '/Non-2xx/ {print $5}' "$OUT/wrk.txt")
      echo "$name $s $c ${rps:-0} ${p50:--} ${p99:--} ${errs:-0}" | tee -a "$OUT/results.txt"
    done
  done
}

wait_for() {
  for _ in $(seq 1 300); do
    curl -sf "$1" >/dev/null 2>&1 && return 0
    sleep 0.3
  done
  echo "compare: $1 did not come up" >&2; return 1
}

# stack NAME [ENV=VALUE...]: the default stack, with those settings, under load.
stack() {
  local name=$1; shift
  env "$@" "$BIN" --config "${SLUICE_COMPARE_CONFIG:-examples/stack.toml}" up > "$OUT/up.out" 2> "$OUT/up.log" &
  local up=$!
  for _ in $(seq 1 300); do grep -q "Sluice is up" "$OUT/up.out" 2>/dev/null && break; sleep 0.3; done
  load "$name" http://127.0.0.1:8000
  kill -TERM "$up"; wait "$up" || true
}
stack sluice
if [ -n "${COMPARE_ALSO:-}" ]; then
  # shellcheck disable=SC2086
  stack sluice-also $COMPARE_ALSO
fi

for n in 1 2; do
  MODELS_DIR=examples/models "$BENCH_VENV/bin/uvicorn" --app-dir deploy/compare fastapi_baseline:app \
    --host 127.0.0.1 --port 8001 --workers "$n" --log-level warning &
  FA=$!
  wait_for http://127.0.0.1:8001/docs
  load "fastapi-$n" http://127.0.0.1:8001
  kill -TERM "$FA"; wait "$FA" || true
done

echo
printf "%-18s %5s %13s %13s %13s %10s %10s %12s\n" servable conc "sluice req/s" "fastapi-1" "fastapi-2" "vs 1 proc" "vs 2 proc" "sluice-also"
for s in $SERVABLES; do
  for c in 1 32; do
    get() { awk -v n="$1" -v s="$s" -v c="$c" '$1==n && $2==s && $3==c {print $4}' "$OUT/results.txt"; }
    sl=$(get sluice); f1=$(get fastapi-1); f2=$(get fastapi-2); also=$(get sluice-also)
    printf "%-18s %5s %13s %13s %13s %9.2fx %9.2fx %12s\n" "$s" "$c" "$sl" "$f1" "$f2" \
      "$(echo "$sl / ($f1 + 0.001)" | bc -l)" "$(echo "$sl / ($f2 + 0.001)" | bc -l)" "${also:--}"
  done
done
echo "(raw lines, with p50/p99 and non-2xx counts: $OUT/results.txt)"
