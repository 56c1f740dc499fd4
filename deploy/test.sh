#!/usr/bin/env bash
# Runs Sluice's whole test suite: installs what is missing (deploy/setup.sh), then unit and
# integration tests. Integration tests start their own Kafka broker and redis-server on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
# Each integration test runs its own broker, Redis, gateway and workers: two at a time fit 2 cores.
cargo test --workspace --features sluice/fail-points -- --test-threads="${SLUICE_TEST_THREADS:-2}"
