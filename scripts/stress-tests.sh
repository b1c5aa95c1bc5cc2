#!/usr/bin/env bash
# Runs the unit tests UNIT times in a row, then the whole suite FULL times in
# a row with a CPU hog busy-looping on every core, and stops at the first
# failure. Used to prove the suite has no flaky test (issue: "the suite must
# pass every time"); not part of CI.
#
#   scripts/stress-tests.sh [UNIT=50] [FULL=5]
#
# Waits in the tests derive their deadlines from REKEY_TEST_BUDGET (default
# 180 s per wait); nothing here changes it.
set -euo pipefail
cd "$(dirname "$0")/.."
unit=${1:-50}
full=${2:-5}
log_dir=${STRESS_LOG_DIR:-target/stress}
mkdir -p "$log_dir"

echo "== building the tests once"
cargo test --workspace --no-run --quiet

start=$(date +%s)
for i in $(seq 1 "$unit"); do
  if ! cargo test --workspace --lib --quiet >"$log_dir/unit-$i.log" 2>&1; then
    echo "unit run $i of $unit FAILED: $log_dir/unit-$i.log"
    grep -E "^(test .* FAILED|---- |thread .* panicked)" "$log_dir/unit-$i.log" | head -20
    exit 1
  fi
  echo "unit run $i/$unit ok ($(( $(date +%s) - start )) s so far)"
done

hogs=()
stop_hogs() { for p in "${hogs[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_hogs EXIT
for _ in $(seq 1 "$(nproc)"); do
  sh -c 'while :; do :; done' &
  hogs+=($!)
done
echo "== $(nproc) CPU hogs running: ${hogs[*]}"
for i in $(seq 1 "$full"); do
  t0=$(date +%s)
  if ! cargo test --workspace --quiet >"$log_dir/full-$i.log" 2>&1; then
    echo "full run $i of $full under load FAILED: $log_dir/full-$i.log"
    grep -E "^(test .* FAILED|---- |thread .* panicked)" "$log_dir/full-$i.log" | head -20
    exit 1
  fi
  echo "full run $i/$full under load ok in $(( $(date +%s) - t0 )) s"
done
echo "stress: $unit unit runs and $full full runs under load, zero failures"
