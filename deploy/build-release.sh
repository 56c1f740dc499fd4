#!/usr/bin/env bash
# Builds the release `sluice` binary, printing progress every 20 s with an estimate of the time
# left (nothing when it is up to date). Crates compiled late take longer than early ones
# (measured here: half the crates in about a quarter of the time), so the time spent is taken to
# grow with the square of the share done, plus 1.5 min for Sluice's own crates and the link.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
log() { echo "[build +$(( $(date +%s) - T0 ))s] $*" >&2; }
# Crates a clean release build compiles (303 measured on 2026-12-03; `cargo metadata` lists 388,
# some of them for other targets only). The last of them, Sluice's own and the thin-LTO link,
# take the longest.
total=${SLUICE_BUILD_CRATES:-305}
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
  if [ "$done_crates" -ge $(( total - 2 )) ]; then
    log "sluice (release): $done_crates crates compiled; compiling Sluice itself and linking (the last 1-2 min)"
    continue
  fi
  left=$(( elapsed * (total * total - done_crates * done_crates) / (done_crates * done_crates) + 90 ))
  log "sluice (release): $done_crates/~$total crates compiled, ~$(( (left + 59) / 60 )) min left"
done
if ! wait "$pid"; then
  tail -30 "$out" >&2
  log "the release build failed"
  exit 1
fi
if grep -q "Compiling" "$out"; then log "sluice (release) built in $(( $(date +%s) - T0 ))s"; fi
rm -f "$out"
