#!/usr/bin/env bash
# Runs every fault drill (tests/drills.rs) against the real stack, each under load for
# SLUICE_DRILL_SECONDS (default 30), one at a time, and writes the Markdown report to
# docs/drills.md (the drill report the README links to). Fails if any drill misses its thresholds.
#   deploy/drills.sh                      # the full set
#   SLUICE_DRILL_SECONDS=10 deploy/drills.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
# shellcheck disable=SC1091
source .sluice-env
seconds="${SLUICE_DRILL_SECONDS:-30}"
rows="$(mktemp)"
trap 'rm -f "$rows"' EXIT
status=0
SLUICE_DRILL_SECONDS="$seconds" SLUICE_DRILL_REPORT="$rows" \
  cargo test -p sluice --features fail-points --test drills -- --test-threads=1 || status=$?
# The drills that live beside the features they exercise: a join worker, the online learner and
# the lookup step's PostgreSQL, each killed under load.
SLUICE_DRILL_SECONDS="$seconds" SLUICE_DRILL_REPORT="$rows" \
  cargo test -p sluice --features fail-points --test graphs --test learning --test logic -- \
  --test-threads=1 a_join_worker_killed a_learner_killed postgres_restarted || status=$?
{
  echo "# Fault drills"
  echo
  echo "\`deploy/drills.sh\` (SLUICE_DRILL_SECONDS=$seconds), $(date -u +%Y-%m-%d), $(nproc) cores."
  echo "Load: closed-loop callers of \`heavy\` (2 partitions) through the gateway, each request checked"
  echo "against onnxruntime's answer; the fault is injected a third of the way in. Lost: accepted"
  echo "(504) with no result record; wrong: an answer or any result record (duplicates included)"
  echo "differing from onnxruntime's; duplicates: extra result records (at-least-once), all equal."
  echo "The join worker, learner and PostgreSQL drills drive their own load (see their notes); their"
  echo "answers are checked as each says (n/a: not measured by that drill)."
  echo
  echo "Recovery: from the fault to the first answer of a request sent after it; longest: the"
  echo "longest wait of any answered request (both in ms; n/a: not measured by that drill)."
  echo
  echo "| drill | sent | correct | wrong | errors | lost | late (504, result exists) | duplicate results | p99 ms (200s) | recovery / longest ms | notes |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  sort "$rows"
  if [ "$status" -ne 0 ]; then
    echo
    echo "**A drill failed its thresholds (cargo test exit $status): see its output.**"
  fi
} > docs/drills.md
echo "report: docs/drills.md"
exit "$status"
