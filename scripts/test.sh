#!/usr/bin/env bash
# All tests: formatting and lints, host unit tests, then the in-QEMU suites (kernel
# conformance, demo, and boots with malformed modules). Ends with "N passed, M failed" and
# exits non-zero on any failure.
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
TASK_CRATES=(-p sigma0 -p roottask -p demo -p ktest -p bench -p l4 -p vmm)

# --- style and lints ---------------------------------------------------------------------
if cargo fmt --all -- --check >"$logdir/fmt.log" 2>&1; then pass "cargo fmt --check"; else fail "cargo fmt --check (see $logdir/fmt.log)"; fi
if cargo clippy --all-targets -- -D warnings >"$logdir/clippy-host.log" 2>&1 \
   && cargo clippy --release --target x86_64-unknown-none "${KERNEL_CRATES[@]}" -- -D warnings >"$logdir/clippy-target.log" 2>&1 \
   && cargo --config .cargo/tasks.toml clippy --release --target x86_64-unknown-linux-gnu "${TASK_CRATES[@]}" -- -D warnings >"$logdir/clippy-tasks.log" 2>&1; then
    pass "cargo clippy (host, kernel for x86_64-unknown-none, tasks for x86_64-unknown-linux-gnu with SSE)"
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

# --- in-QEMU suites ----------------------------------------------------------------------
if ! scripts/build.sh demo test vm bad-module bad-sigma0 >"$logdir/build.log" 2>&1; then
    cat "$logdir/build.log"
    fail "build of kernel, tasks and ISOs"
    echo "$passed passed, $failed failed"
    exit 1
fi

# boot ISO TIMEOUT LOG: runs QEMU, returns its exit status.
boot() {
    QEMU_TIMEOUT=$2 scripts/qemu.sh "target/iso/$1.iso" >"$3" 2>&1 </dev/null
}

# Kernel conformance suite: every "ok N"/"not ok N" line counts; the plan must match.
log=$logdir/ktest.log
boot test 600 "$log"
status=$?
ok_lines=$(grep -cE "^ok [0-9]+ - " "$log")
bad_lines=$(grep -cE "^not ok [0-9]+ - " "$log")
grep -E "^not ok [0-9]+ - |PANIC|WARN" "$log" || true
passed=$((passed + ok_lines))
failed=$((failed + bad_lines))
plan=$(grep -E "^1\.\.[0-9]+" "$log" | tr -d '\r' | sed 's/1\.\.//' | tail -1)
echo "ktest: $ok_lines ok, $bad_lines not ok, plan ${plan:-missing}, QEMU status $status"
if [ -z "$plan" ] || [ "$plan" != $((ok_lines + bad_lines)) ]; then fail "ktest: plan line missing or count mismatch (see $log)"; fi
if [ "$status" = 33 ]; then pass "ktest: clean power-off (isa-debug-exit 0x10)"; else fail "ktest: QEMU exit status $status, want 33 (see $log)"; fi

# Guest suite: SVM VMs run by a VMM task; every "ok N - guest:" line counts.
log=$logdir/vm.log
boot vm 600 "$log"
status=$?
ok_lines=$(grep -cE "^ok [0-9]+ - guest: " "$log")
bad_lines=$(grep -cE "^not ok [0-9]+ - guest: " "$log")
grep -E "^not ok [0-9]+ - |PANIC|\[vmm\]" "$log" || true
passed=$((passed + ok_lines))
failed=$((failed + bad_lines))
echo "guest suite: $ok_lines ok, $bad_lines not ok, QEMU status $status"
if [ "$status" = 33 ] && [ "$ok_lines" -gt 0 ]; then pass "guest suite: clean power-off"; else fail "guest suite: QEMU exit status $status (see $log)"; fi

# Without SVM the kernel refuses VMs cleanly: the VMM gets an error, nothing crashes.
log=$logdir/vm-nosvm.log
QEMU_TIMEOUT=300 scripts/qemu.sh target/iso/vm.iso -cpu max,svm=off >"$log" 2>&1 </dev/null
status=$?
if [ "$status" = 35 ] && grep -q "SVM with nested paging not available" "$log" && grep -q "cannot create a VM: not supported" "$log" && ! grep -q PANIC "$log"; then
    pass "kernel: without SVM, VM creation fails cleanly with NotSupported"
else
    fail "kernel: no-SVM refusal (status $status, see $log)"
fi

# Demo: ping/pong over IPC, both exit cleanly.
log=$logdir/demo.log
boot demo 300 "$log"
status=$?
if [ "$status" = 33 ] && grep -q "\[ping\] round 5: sent 16, got 32" "$log" && grep -q "\[pong\] quit after 5 requests" "$log" \
   && grep -q "\[root\] all tasks finished, 0 failures" "$log"; then
    pass "demo: ping and pong exchange 5 calls and exit"
else
    fail "demo: unexpected output or status $status (see $log)"
fi

# A malformed ELF module is rejected by the root task with a clear error; the rest runs.
log=$logdir/bad-module.log
boot bad-module 300 "$log"
status=$?
if [ "$status" = 35 ] && grep -q "rejected: " "$log" && grep -q "\[ping\] done" "$log" && ! grep -q PANIC "$log"; then
    pass "root: malformed ELF module rejected with a clear error, other tasks still run"
else
    fail "root: malformed module handling (status $status, see $log)"
fi

# A malformed sigma0 image stops the kernel with a clear panic message (QEMU status 37).
log=$logdir/bad-sigma0.log
boot bad-sigma0 120 "$log"
status=$?
if [ "$status" = 37 ] && grep -q "PANIC" "$log" && grep -q "boot module 'sigma0' (sigma0) is not a loadable ELF image" "$log"; then
    pass "kernel: malformed sigma0 image refused with a clear panic"
else
    fail "kernel: malformed sigma0 handling (status $status, see $log)"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
