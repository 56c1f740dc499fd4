#!/usr/bin/env bash
# Installs everything Sluice's local stack and tests need on a fresh Debian machine.
# Idempotent and fast on re-runs: each step is skipped when its result is already there.
#   - Debian packages: redis-server, kcat, libb64-0d (perf_analyzer), build tools for librdkafka;
#     PostgreSQL running on 127.0.0.1:5432 (the machine's own, or installed and started)
#   - tansu 0.6.0 (Kafka-compatible broker) from crates.io, built alongside the Python set-up
#   - a Python venv in .venv with onnxruntime 1.31.1 (its shared library is what the workers load),
#     scikit-learn/skl2onnx for the example models; unless SLUICE_SETUP=stack (deploy/up.sh: only
#     what the local stack needs), tritonclient (.venv-triton) and Feast (.venv-feast) for
#     compatibility checks and the fraud example, schemathesis (.venv-schemathesis) to fuzz the
#     gateway from its OpenAPI document
#   - the example models (examples/models/*.onnx; `heavy` is generated here, not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
log() { echo "[setup +$(( $(date +%s) - T0 ))s] $*" >&2; }

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v kcat >/dev/null || need_apt+=(kcat)
dpkg -s libb64-0d >/dev/null 2>&1 || need_apt+=(libb64-0d)
command -v make >/dev/null || need_apt+=(make)
command -v curl >/dev/null || need_apt+=(curl)
command -v g++ >/dev/null || need_apt+=(g++)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# PostgreSQL (the database lookup step's tests): the machine's own, on 127.0.0.1:5432, with the
# postgres user trusted over local TCP; installed and started here when missing.
if ! command -v pg_isready >/dev/null || ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if ! command -v pg_ctlcluster >/dev/null; then
    log "apt-get install postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  # A package installed without a cluster (or one removed) gets one; then it is started.
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}' | grep -qx "$pg_version/main"; then
    log "PostgreSQL: creating cluster $pg_version/main"
    pg_createcluster "$pg_version" main >/dev/null
  fi
  log "PostgreSQL: starting $pg_version/main"
  pg_ctlcluster "$pg_version" main start 2>/dev/null || service postgresql start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL did not start"; exit 1; }
fi
if ! psql -h 127.0.0.1 -U postgres -c 'select 1' >/dev/null 2>&1; then
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | tail -1)
  if [ -n "$hba" ]; then
    log "PostgreSQL: trusting the postgres user over 127.0.0.1 ($hba)"
    sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_ctlcluster "$pg_version" main reload 2>/dev/null || service postgresql reload
  fi
fi

if ! command -v cargo >/dev/null; then
  log "cargo not found: install a Rust toolchain (rustup) first"; exit 1
fi
# The broker: an installed one is used as it is (SLUICE_TANSU_BIN, or a broker already answering
# at kafka.brokers, which `sluice up` uses without starting tansu). Otherwise tansu 0.6.0 is built
# from crates.io once, in the background while the Python side is set up, with only the storage
# engines named in SLUICE_TANSU_FEATURES (default: dynostore, the memory engine `sluice up` uses;
# add libsql for sqlite:// storage).
# The tests (deploy/test.sh) ask for libsql too: their broker kill -9 drill needs storage that
# survives it. The engines a build has are noted beside the binary (<bin>.features; a binary
# without that note was built with the old default, dynostore), so a broker lacking one that is
# asked for is rebuilt; one named by SLUICE_TANSU_BIN is used as it is.
TANSU_BIN="${SLUICE_TANSU_BIN:-${CARGO_HOME:-$HOME/.cargo}/bin/tansu}"
TANSU_FEATURES="${SLUICE_TANSU_FEATURES:-dynostore}"
TANSU_STAMP="$TANSU_BIN.features"
tansu_ready() {
  [ -x "$TANSU_BIN" ] || return 1
  [ -n "${SLUICE_TANSU_BIN:-}" ] && return 0
  local have f
  have=$(cat "$TANSU_STAMP" 2>/dev/null || echo dynostore)
  for f in ${TANSU_FEATURES//,/ }; do
    [[ ",$have," == *",$f,"* ]] || return 1
  done
}
TANSU_PID=
if ! tansu_ready; then
  TANSU_LOG=$(mktemp)
  TANSU_STARTED=$(date +%s)
  # Crates it compiles (counted): 395 with dynostore, 410 with libsql too.
  extra=$(tr ',' '\n' <<<"$TANSU_FEATURES" | grep -vc '^dynostore$' || true)
  TANSU_CRATES=$(( 395 + 15 * extra ))
  log "building tansu 0.6.0 ($TANSU_FEATURES) in the background (first time only; 9-11 min on 2 cores); log: $TANSU_LOG"
  cargo install tansu@0.6.0 --locked --force --no-default-features --features "$TANSU_FEATURES" \
    --root "$(dirname "$(dirname "$TANSU_BIN")")" >"$TANSU_LOG" 2>&1 &
  TANSU_PID=$!
fi

# make_venv DIR REQUIREMENTS: (re)creates a venv when its requirements file changed.
make_venv() {
  local dir=$1 req=$2
  if [ ! -f "$dir/.sluice-requirements" ] || ! cmp -s "$req" "$dir/.sluice-requirements"; then
    log "creating Python venv $dir from $req"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q -r "$req"
    cp "$req" "$dir/.sluice-requirements"
  fi
}
VENV="$ROOT/.venv"
make_venv "$VENV" "$ROOT/deploy/requirements.txt"
if [ "${SLUICE_SETUP:-all}" != stack ]; then
  # tritonclient (and perf_analyzer) pin an older numpy, so they live in their own venv.
  make_venv "$ROOT/.venv-triton" "$ROOT/deploy/requirements-triton.txt"
  # Feast (the fraud example's feature store, and the compatibility tests) pins its own numpy too.
  make_venv "$ROOT/.venv-feast" "$ROOT/deploy/requirements-feast.txt"
  # schemathesis: fuzzes the gateway from its OpenAPI document (docs/openapi.yaml).
  make_venv "$ROOT/.venv-schemathesis" "$ROOT/deploy/requirements-schemathesis.txt"
fi

ORT_LIB=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 | head -1)
[ -f "$ORT_LIB" ] || { log "onnxruntime shared library missing"; exit 1; }

if [ ! -f "$ROOT/examples/models/heavy.onnx" ] || [ ! -f "$ROOT/examples/models/mlp.onnx" ] || [ ! -f "$ROOT/examples/models/echo.onnx" ]; then
  log "generating example models"
  "$VENV/bin/python" "$ROOT/examples/make_models.py"
fi

# Waits for the tansu build, printing progress and an estimate of the time left. Later crates
# take longer than early ones (measured here: half the crates in about a quarter of the time), so
# the time spent is taken to grow with the square of the share of crates done, plus a minute for
# the final link.
if [ -n "$TANSU_PID" ]; then
  while kill -0 "$TANSU_PID" 2>/dev/null; do
    sleep 30
    done_crates=$(grep -c "Compiling" "$TANSU_LOG" || true)
    elapsed=$(( $(date +%s) - TANSU_STARTED ))
    if [ "$done_crates" -gt 10 ]; then
      total=$(( TANSU_CRATES > done_crates ? TANSU_CRATES : done_crates ))
      left=$(( (elapsed * (total * total - done_crates * done_crates) / (done_crates * done_crates) + 60) / 60 ))
      log "tansu: $done_crates/~$TANSU_CRATES crates compiled, ~$(( left > 1 ? left : 1 )) min left"
    fi
  done
  wait "$TANSU_PID" || { tail -20 "$TANSU_LOG" >&2; log "building tansu failed"; exit 1; }
  echo "$TANSU_FEATURES" > "$TANSU_STAMP"
  log "tansu built in $(( ($(date +%s) - TANSU_STARTED) / 60 )) min"
fi

# Environment for the other scripts (sourced by deploy/env.sh users).
cat > "$ROOT/.sluice-env" <<ENV
export ORT_DYLIB_PATH="$ORT_LIB"
export PATH="$VENV/bin:${CARGO_HOME:-$HOME/.cargo}/bin:\$PATH"
export SLUICE_TANSU_BIN="$TANSU_BIN"
ENV
log "ready (ORT_DYLIB_PATH=$ORT_LIB)"
