#!/usr/bin/env bash
# The local stack in one command: installs what is missing, builds Sluice (release), then runs
# `sluice up` (a single-node Apache Kafka, Redis if none answers, the demo data, topics, gateway,
# workers, learners) with examples/stack.toml: digits graphs, fraud, online learning and bandits.
# Ctrl-C stops everything. Extra arguments go to `sluice up`'s config: deploy/up.sh [CONFIG]
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
# Only what the stack needs (the test suite's extra venvs are left to deploy/test.sh).
SLUICE_SETUP=stack deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
deploy/build-release.sh
echo "[up +$(( $(date +%s) - T0 ))s] starting the stack" >&2
exec target/release/sluice --config "${1:-examples/stack.toml}" up
