#!/usr/bin/env bash
# Installs everything Sluice's local stack and tests need on a fresh Debian machine.
# Idempotent and fast on re-runs: each step is skipped when its result is already there.
#   - Debian packages: redis-server, kcat, libb64-0d (perf_analyzer), build tools for librdkafka
#   - tansu 0.6.0 (Kafka-compatible broker) from crates.io
#   - a Python venv in .venv with onnxruntime 1.31.1 (its shared library is what the workers load),
#     scikit-learn/skl2onnx for the example models, tritonclient for compatibility checks
#   - the example models (examples/models/*.onnx; `heavy` is generated here, not committed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
log() { echo "[setup] $*" >&2; }

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

if ! command -v cargo >/dev/null; then
  log "cargo not found: install a Rust toolchain (rustup) first"; exit 1
fi
TANSU_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
if [ ! -x "$TANSU_BIN" ]; then
  log "building tansu 0.6.0 (first time only; ~30 min on 2 cores)"
  cargo install tansu@0.6.0 --locked --features dynostore,libsql
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
# tritonclient (and perf_analyzer) pin an older numpy, so they live in their own venv.
make_venv "$ROOT/.venv-triton" "$ROOT/deploy/requirements-triton.txt"

ORT_LIB=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 | head -1)
[ -f "$ORT_LIB" ] || { log "onnxruntime shared library missing"; exit 1; }

if [ ! -f "$ROOT/examples/models/heavy.onnx" ] || [ ! -f "$ROOT/examples/models/mlp.onnx" ]; then
  log "generating example models"
  "$VENV/bin/python" "$ROOT/examples/make_models.py"
fi

# Environment for the other scripts (sourced by deploy/env.sh users).
cat > "$ROOT/.sluice-env" <<ENV
export ORT_DYLIB_PATH="$ORT_LIB"
export PATH="$VENV/bin:${CARGO_HOME:-$HOME/.cargo}/bin:\$PATH"
export SLUICE_TANSU_BIN="$TANSU_BIN"
ENV
log "ready (ORT_DYLIB_PATH=$ORT_LIB)"
