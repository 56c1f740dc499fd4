#!/usr/bin/env bash
# Sluice as users start it against FastAPI + onnxruntime, same wrk load, same run.
# Starts the default stack (`sluice up` with examples/stack.toml, every example deployed, as
# deploy/up.sh does: Apache Kafka, Redis, gateway, workers, learners), loads mlp,
# digits-pipeline, digits-ensemble and heavy at concurrency 1 and 32 with wrk, stops it; then
# does the same against deploy/compare/fastapi_baseline.py under uvicorn with 1 and 2 worker
# processes. All of that COMPARE_ROUNDS times (default 2), interleaved, and prints the median of
# each figure: req/s, p50 and p99, and the CPU time per request of every process of the system
# under test (for Sluice: the broker, Redis, gateway, workers and learners) from /proc. Each
# servable gets WARMUP seconds (default 3) of unmeasured load first, on every system alike.
# usage: deploy/compare.sh [SECONDS_PER_RUN]   (default 10; SLUICE_BIN=path compares another build;
#        COMPARE_ALSO="SLUICE__WORKER__LOCAL_HOPS=false" also runs the stack with those settings,
#        as a column "sluice-also", in the same rounds; COMPARE_ALSO_BIN=path runs that column
#        from another build, e.g. before and after a change; SLUICE_COMPARE_CONFIG=examples/digits.toml
#        serves the digits examples only)
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
  deploy/build-release.sh
fi
BIN=${SLUICE_BIN:-target/release/sluice}
SECS=${1:-10}
ROUNDS=${COMPARE_ROUNDS:-2}
SERVABLES="mlp digits-pipeline digits-ensemble heavy"
OUT=$(mktemp -d)
TICKS=$(getconf CLK_TCK)

# tree_ticks PID: user+system clock ticks of PID and every process below it.
tree_ticks() {
  local pids
  pids=$(ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END { for (p in parent) { q = p; while (q != "" && q != 0 && q != root) q = parent[q]; if (q == root) print p } }')
  local total=0 t
  for p in $pids; do
    t=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
    total=$(( total + ${t:-0} ))
  done
  echo "$total"
}

# load NAME ROUND ROOT_PID URL_BASE: one wrk run per servable and concurrency; appends
# "NAME ROUND servable c rps p50 p99 non2xx cpu_ms_per_request" to results.txt.
load() {
  local name=$1 round=$2 root=$3 base=$4
  for s in $SERVABLES; do
    # Warm-up, not measured: every system's first seconds under load (a JVM's JIT, Python's
    # imports, connection pools) are left out alike.
    BODY="examples/requests/$s.json" wrk -t2 -c32 -d"${WARMUP:-3}s" -s deploy/compare/post.lua \
      "$base/v2/models/$s/infer" > /dev/null 2>&1 || true
    for c in 1 32; do
      local threads=$(( c < 2 ? 1 : 2 ))
      local t0 t1
      t0=$(tree_ticks "$root")
      BODY="examples/requests/$s.json" wrk -t"$threads" -c"$c" -d"${SECS}s" --latency \
        -s deploy/compare/post.lua "$base/v2/models/$s/infer" > "$OUT/wrk.txt" 2>&1 || true
      t1=$(tree_ticks "$root")
      local rps p50 p99 errs n cpu
      rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$OUT/wrk.txt")
      p50=$(awk '$1=="50%" {print $2}' "$OUT/wrk.txt")
      p99=$(awk '$1=="99%" {print $2}' "$OUT/wrk.txt")
      errs=$(awk '/Non-2xx/ {print $5}' "$OUT/wrk.txt")
      n=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
      cpu=$(awk -v d=$(( t1 - t0 )) -v n="${n:-0}" -v hz="$TICKS" 'BEGIN { if (n > 0) printf "%.3f", d * 1000 / hz / n; else print "-" }')
      echo "$name $round $s $c ${rps:-0} ${p50:--} ${p99:--} ${errs:-0} $cpu" | tee -a "$OUT/results.txt"
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

# stack NAME ROUND BIN [ENV=VALUE...]: the default stack run by BIN, with those settings, under
# load.
stack() {
  local name=$1 round=$2 bin=$3; shift 3
  env "$@" "$bin" --config "${SLUICE_COMPARE_CONFIG:-examples/stack.toml}" up > "$OUT/up.out" 2> "$OUT/up.log" &
  local up=$!
  for _ in $(seq 1 600); do grep -q "Sluice is up" "$OUT/up.out" 2>/dev/null && break; sleep 0.3; done
  grep -q "Sluice is up" "$OUT/up.out" || { tail -20 "$OUT/up.log" >&2; echo "compare: the stack did not come up" >&2; exit 1; }
  load "$name" "$round" "$up" http://127.0.0.1:8000
  kill -TERM "$up"; wait "$up" || true
}

fastapi() {
  local n=$1 round=$2
  MODELS_DIR=examples/models "$BENCH_VENV/bin/uvicorn" --app-dir deploy/compare fastapi_baseline:app \
    --host 127.0.0.1 --port 8001 --workers "$n" --log-level warning &
  local fa=$!
  wait_for http://127.0.0.1:8001/docs
  load "fastapi-$n" "$round" "$fa" http://127.0.0.1:8001
  kill -TERM "$fa"; wait "$fa" || true
}

for round in $(seq 1 "$ROUNDS"); do
  stack sluice "$round" "$BIN"
  if [ -n "${COMPARE_ALSO:-}${COMPARE_ALSO_BIN:-}" ]; then
    # shellcheck disable=SC2086
    stack sluice-also "$round" "${COMPARE_ALSO_BIN:-$BIN}" ${COMPARE_ALSO:-}
  fi
  fastapi 1 "$round"
  fastapi 2 "$round"
done

echo
python3 deploy/compare/table.py "$OUT/results.txt"
echo "(raw lines, one per run: $OUT/results.txt)"
