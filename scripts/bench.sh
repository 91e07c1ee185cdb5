#!/usr/bin/env bash
# Kernel benchmarks: boots the benchmark task twice in QEMU with -icount shift=0 (rdtsc then
# counts guest instructions exactly), once with the IPC fast path disabled (kernel command
# line `nofastpath`) and once enabled, with lazy FPU switching (the default) and once more with
# eager FPU switching (`eagerfpu`). Writes target/bench/kernel.json and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh bench bench-slowpath bench-eagerfpu vm-bench >&2
mkdir -p target/bench

run() {
    local scenario=$1 log=target/bench/$1.log status=0
    QEMU_TIMEOUT=900 scripts/qemu.sh "target/iso/$scenario.iso" -icount shift=0 >"$log" 2>&1 </dev/null || status=$?
    if [ "$status" != 33 ]; then
        echo "bench.sh: $scenario run failed (QEMU status $status); see $log" >&2
        exit 1
    fi
}
run bench
run bench-slowpath
run bench-eagerfpu
run vm-bench

python3 - <<'PY'
import json, re
def parse(path):
    out = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.match(r"bench: (\S+) median=(\d+) min=(\d+) iterations=(\d+)", line.strip())
        if m:
            out[m.group(1)] = {"median": int(m.group(2)), "min": int(m.group(3)), "iterations": int(m.group(4))}
    return out
fast = parse("target/bench/bench.log")
slow = parse("target/bench/bench-slowpath.log")
eager = parse("target/bench/bench-eagerfpu.log")
vm = parse("target/bench/vm-bench.log")
result = {
    "unit": "guest instructions (QEMU TCG, -icount shift=0, rdtsc deltas), median",
    "fast_path": fast,
    "slow_path": slow,
    "fast_path_eager_fpu": eager,
    "vm": vm,
}
json.dump(result, open("target/bench/kernel.json", "w"), indent=2)
names = list(fast.keys())
width = max(len(n) for n in names) + 2
print(f"{'benchmark':<{width}} {'slow path':>10} {'fast path':>10} {'eager FPU':>10}")
for n in names:
    s = slow.get(n, {}).get("median", "-")
    f = fast[n]["median"]
    e = eager.get(n, {}).get("median", "-")
    print(f"{n:<{width}} {s:>10} {f:>10} {e:>10}")
print()
print(f"{'VM exit (measured in the guest)':<{width}} {'':>10} {'median':>10}")
for n, v in vm.items():
    print(f"{n:<{width}} {'':>10} {v['median']:>10}")
ipc = fast.get("ipc_call_reply_cross_space_0w", {}).get("median")
hc = vm.get("vm_hypercall_round_trip", {}).get("median")
if ipc and hc:
    print(f"one hypercall exit round trip = {hc / ipc:.2f} x one IPC call+reply (fast path)")
print("(guest instructions, median; JSON in target/bench/kernel.json)")
PY
