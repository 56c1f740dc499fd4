#!/usr/bin/env bash
# Fuzzes Sluice's input decoders and config compiler with cargo-fuzz (libFuzzer, nightly Rust):
# oip_json and oip_binary (the gateway's request decoders), avro_envelope (every record Sluice
# reads from Kafka), config_compile (config loading, validation and the graph compiler).
#   deploy/fuzz.sh                      # each target for FUZZ_SECONDS (default 600)
#   FUZZ_SECONDS=20 FUZZ_TARGETS="oip_json oip_binary avro_envelope" deploy/fuzz.sh   # CI's run
# Starts from the committed seeds in fuzz/corpus/<target>/ (new finds go to a scratch corpus);
# a crash stops the run, its input saved under fuzz/artifacts/<target>/. A crash found becomes a
# regression test next to the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-600}"
targets="${FUZZ_TARGETS:-oip_json oip_binary avro_envelope config_compile}"
log() { echo "[fuzz] $*" >&2; }
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz > /dev/null; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
  features=()
  [ "$t" = config_compile ] && features=(--features config)
  mkdir -p "$scratch/$t"
  log "$t for ${seconds}s"
  cargo +nightly fuzz run "${features[@]}" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -max_len=65536 -print_final_stats=1
done
log "no crash in: $targets"
