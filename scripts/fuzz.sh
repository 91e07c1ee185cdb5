#!/usr/bin/env bash
# A long fuzzing campaign on the current kernel: boots scenario `fuzz-long` (the stateful
# fuzzer under -icount shift=0, so its TSC deltas count guest instructions) again and again,
# each boot with the next SEEDS_PER_BOOT seeds, until --seeds seeds ran or --hours passed.
# Usage: scripts/fuzz.sh [--seeds N] [--hours H] [--first SEED]
# Logs of failing boots stay in target/fuzz/; ends with one summary line:
#   fuzz.sh: N operations, S seeds, F failures, slowest syscall I instructions (syscall K, seeds A..B)
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=100
hours=0
first=1000
per_boot=${SEEDS_PER_BOOT:-2}
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds=$2; shift 2 ;;
        --hours) hours=$2; shift 2 ;;
        --first) first=$2; shift 2 ;;
        *) echo "usage: scripts/fuzz.sh [--seeds N] [--hours H] [--first SEED]" >&2; exit 2 ;;
    esac
done
# With --hours, the seed count is only an upper bound.
[ "$hours" = 0 ] || seeds=${FUZZ_MAX_SEEDS:-1000000000}
deadline=$(( $(date +%s) + $(awk "BEGIN{print int($hours * 3600)}") ))
mkdir -p target/fuzz

operations=0 done_seeds=0 failures=0 slowest=0 slowest_at="none"
seed=$first
while [ "$done_seeds" -lt "$seeds" ]; do
    if [ "$hours" != 0 ] && [ "$(date +%s)" -ge "$deadline" ]; then
        break
    fi
    n=$(( seeds - done_seeds < per_boot ? seeds - done_seeds : per_boot ))
    log=target/test-logs/fuzz-long.log
    MODULE_ARGS="fuzz: seed=$seed seeds=$n" cargo xtask test fuzz-long >/dev/null 2>&1 || true
    summary=$(grep -a '^fuzz: summary:' "$log" | tail -1 || true)
    bad=$(grep -ac '^not ok ' "$log" || true)
    if [ -z "$summary" ] || [ "$bad" -gt 0 ] || grep -aq PANIC "$log"; then
        failures=$(( failures + (bad > 0 ? bad : 1) ))
        cp "$log" "target/fuzz/failed-seeds-$seed-$((seed + n - 1)).log"
        echo "fuzz.sh: seeds $seed..$((seed + n - 1)): FAILED (log target/fuzz/failed-seeds-$seed-$((seed + n - 1)).log)" >&2
        grep -a '^not ok \|PANIC' "$log" | head -5 >&2 || true
    fi
    if [ -n "$summary" ]; then
        ops=$(sed -E 's/^fuzz: summary: ([0-9]+) operations.*/\1/' <<<"$summary")
        ticks=$(sed -E 's/.*slowest syscall ([0-9]+) took ([0-9]+) ticks.*/\2/' <<<"$summary")
        number=$(sed -E 's/.*slowest syscall ([0-9]+) took.*/\1/' <<<"$summary")
        operations=$(( operations + ops ))
        if [ "$ticks" -gt "$slowest" ]; then
            slowest=$ticks slowest_at="syscall $number, seeds $seed..$((seed + n - 1))"
        fi
    fi
    done_seeds=$(( done_seeds + n ))
    seed=$(( seed + n ))
    echo "fuzz.sh: $done_seeds seeds, $operations operations, $failures failures so far" >&2
done
echo "fuzz.sh: $operations operations, $done_seeds seeds, $failures failures, slowest syscall $slowest instructions ($slowest_at)"
[ "$failures" -eq 0 ]
