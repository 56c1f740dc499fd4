#!/usr/bin/env bash
# Checks the crates' layering: the pure crates (config and graph compiler, online learners,
# feature rows) build without a Kafka client, so they stay cheap to test and to reuse.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for crate in sluice-schemas sluice-config sluice-learn sluice-features; do
  if cargo tree --locked -p "$crate" -e normal --prefix none | grep -q '^rdkafka '; then
    echo "layering: $crate depends on rdkafka (it must not)" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "layering: schemas, config, learn and features build without rdkafka"
exit "$status"
