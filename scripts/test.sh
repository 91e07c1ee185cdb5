#!/usr/bin/env bash
# All tests: formatting and lints, host unit tests (the runner's included), then the in-QEMU
# scenarios of scenarios.toml (kernel conformance, guest suite, demo, and boots with malformed
# modules or without SVM). Ends with "N passed, M failed" and exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok - $*"; }
fail() { failed=$((failed + 1)); echo "not ok - $*"; }
logdir=target/test-logs
mkdir -p "$logdir"

# The kernel and guest images build soft-float; the user tasks with SSE (see scripts/build.sh).
KERNEL_CRATES=(-p kernel -p guest-basic)
TASK_CRATES=(-p sigma0 -p roottask -p demo -p ktest -p bench -p l4 -p vmm -p cons -p netsw -p uplink -p sysmon -p fuzz)

# --- style and lints ---------------------------------------------------------------------
if cargo fmt --all -- --check >"$logdir/fmt.log" 2>&1; then pass "cargo fmt --check"; else fail "cargo fmt --check (see $logdir/fmt.log)"; fi
if cargo clippy --all-targets -- -D warnings >"$logdir/clippy-host.log" 2>&1 \
   && cargo clippy --release --target x86_64-unknown-none "${KERNEL_CRATES[@]}" -- -D warnings >"$logdir/clippy-target.log" 2>&1 \
   && cargo --config .cargo/tasks.toml clippy --release --target x86_64-unknown-linux-gnu "${TASK_CRATES[@]}" -- -D warnings >"$logdir/clippy-tasks.log" 2>&1 \
   && cargo --config .cargo/guest32.toml clippy --release --target i686-unknown-linux-gnu -p guest-multiboot -- -D warnings >"$logdir/clippy-guest32.log" 2>&1; then
    pass "cargo clippy (host, kernel for x86_64-unknown-none, tasks for x86_64-unknown-linux-gnu with SSE, the 32-bit guest for i686)"
else
    fail "cargo clippy (see $logdir/clippy-*.log)"
fi

# --- host unit tests ---------------------------------------------------------------------
if cargo test 2>&1 | tee "$logdir/host.log" | grep -E "^test result|panicked|FAILED" ; then :; fi
host_passed=$(grep -E "^test result" "$logdir/host.log" | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
host_failed=$(grep -E "^test result" "$logdir/host.log" | sed -E 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\2/' | awk '{s+=$1} END {print s+0}')
if ! grep -q "^test result" "$logdir/host.log" || grep -qE "^error(\[|:)" "$logdir/host.log"; then
    fail "host unit tests did not build or run (see $logdir/host.log)"
fi
passed=$((passed + ${host_passed:-0}))
failed=$((failed + ${host_failed:-0}))
echo "host unit tests: ${host_passed:-0} passed, ${host_failed:-0} failed"

# --- the guest Linux ---------------------------------------------------------------------
# The Linux compartment scenarios boot the guest kernel and initramfs: build them (cached by
# version and configuration under target/linux/cache; the first build takes a few minutes).
if ! scripts/build-linux.sh; then
    fail "scripts/build-linux.sh (see target/linux/build.log)"
fi

# --- in-QEMU suites ----------------------------------------------------------------------
# The scenarios of group "test" in scenarios.toml, booted and checked by the runner (xtask/):
# each TAP line of the kernel and guest suites counts, each suite's fixed plan is one check,
# and each scenario's status and output is one check. Logs: $logdir/NAME.log.
cargo xtask test --logs "$logdir" 2>&1 | tee "$logdir/scenarios.log"
summary=$(grep -E "^scenarios: [0-9]+ passed, [0-9]+ failed$" "$logdir/scenarios.log" | tail -1)
if [ -z "$summary" ]; then
    fail "scenario runner did not run (see $logdir/scenarios.log)"
else
    passed=$((passed + $(echo "$summary" | sed -E 's/^scenarios: ([0-9]+) passed.*/\1/')))
    failed=$((failed + $(echo "$summary" | sed -E 's/.* ([0-9]+) failed$/\1/')))
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
