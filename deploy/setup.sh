#!/usr/bin/env bash
# Installs everything Sluice's local stack and tests need on a fresh Debian machine.
# Idempotent and fast on re-runs: each step is skipped when its result is already there.
#   - Debian packages: redis-server, kcat, libb64-0d (perf_analyzer), build tools for librdkafka,
#     a Java 17 runtime and Maven; PostgreSQL running on 127.0.0.1:5432 (the machine's own, or
#     installed and started)
#   - Apache Kafka (the version deploy/kafka/pom.xml pins) from Maven Central: its jars in
#     ~/.cache/sluice/kafka-<version>/libs, fetched alongside the Python set-up
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
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
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
# The broker: Apache Kafka's jars from Maven Central (deploy/kafka/pom.xml), copied once into a
# cache folder by Maven's dependency plugin, in the background while the Python side is set up.
# SLUICE_KAFKA_LIBS names another folder of Kafka jars to use as it is.
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/deploy/kafka/pom.xml")
KAFKA_LIBS="${SLUICE_KAFKA_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/kafka-$KAFKA_VERSION/libs}"
KAFKA_PID=
if [ ! -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] && [ -z "${SLUICE_KAFKA_LIBS:-}" ]; then
  KAFKA_LOG=$(mktemp)
  log "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_LIBS (first time only; log: $KAFKA_LOG)"
  (mvn -B -q -f "$ROOT/deploy/kafka/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS.part" >"$KAFKA_LOG" 2>&1 \
    && rm -rf "$KAFKA_LIBS" && mv "$KAFKA_LIBS.part" "$KAFKA_LIBS") &
  KAFKA_PID=$!
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

if [ -n "$KAFKA_PID" ]; then
  wait "$KAFKA_PID" || { tail -20 "$KAFKA_LOG" >&2; log "fetching Apache Kafka failed"; exit 1; }
  log "Apache Kafka $KAFKA_VERSION: $(ls "$KAFKA_LIBS" | wc -l) jars in $KAFKA_LIBS"
fi

# Environment for the other scripts (sourced by deploy/env.sh users).
cat > "$ROOT/.sluice-env" <<ENV
export ORT_DYLIB_PATH="$ORT_LIB"
export PATH="$VENV/bin:${CARGO_HOME:-$HOME/.cargo}/bin:\$PATH"
export SLUICE_KAFKA_LIBS="$KAFKA_LIBS"
ENV
log "ready (ORT_DYLIB_PATH=$ORT_LIB)"
