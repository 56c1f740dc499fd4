#!/usr/bin/env bash
# Builds the release `sluice` binary, printing progress every 20 s with an estimate of the time
# left (nothing when it is up to date). Crates compiled late take longer than early ones
# (measured here: half the crates in about a quarter of the time), so the time spent is taken to
# grow with the square of the share done, plus a minute for the final link with thin LTO.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
log() { echo "[build +$(( $(date +%s) - T0 ))s] $*" >&2; }
# Every package the build may compile (an upper bound: some are for other targets).
total=$(cargo metadata --format-version 1 --locked 2>/dev/null \
  | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["packages"]))' 2>/dev/null || echo 0)
out=$(mktemp)
cargo build --release --locked --bin sluice >"$out" 2>&1 &
pid=$!
last=$T0
while kill -0 "$pid" 2>/dev/null; do
  sleep 2
  now=$(date +%s)
  [ $(( now - last )) -ge 20 ] || continue
  last=$now
  done_crates=$(grep -c "^ *Compiling" "$out" || true)
  [ "$done_crates" -gt 0 ] || continue
  elapsed=$(( now - T0 ))
  t=$(( total > done_crates ? total : done_crates ))
  left=$(( elapsed * (t * t - done_crates * done_crates) / (done_crates * done_crates) + 60 ))
  log "sluice (release): $done_crates/~$t crates compiled, ~$(( (left + 59) / 60 )) min left"
done
if ! wait "$pid"; then
  tail -30 "$out" >&2
  log "the release build failed"
  exit 1
fi
if grep -q "Compiling" "$out"; then log "sluice (release) built in $(( $(date +%s) - T0 ))s"; fi
rm -f "$out"
