#!/usr/bin/env bash
# Kernel benchmarks: boots the scenarios of group "bench" in scenarios.toml (QEMU with
# -icount shift=0, so rdtsc counts guest instructions exactly): the benchmark task once with
# the IPC fast path disabled (kernel command line `nofastpath`) and once enabled, and the
# guest-side VM-exit benchmarks, once more with eager FPU switching (`eagerfpu`), and the
# latency of a timer wake-up during long syscalls (`bench-latency`). Logs in target/bench/; writes target/bench/kernel.json and
# prints a table. Then Linux in a compartment against native Linux (scripts/bench-linux.sh,
# target/bench/linux.json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p target/bench
if ! cargo xtask bench >&2; then
    echo "bench.sh: a benchmark run failed (see above; logs in target/bench/)" >&2
    exit 1
fi

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
latency = {}
for line in open("target/bench/bench-latency.log", encoding="utf-8", errors="replace"):
    m = re.match(r"latency: (\S+) worst=(\d+) op=(\d+) wakes=(\d+) busy=(\d+)", line.strip())
    if m:
        latency[m.group(1)] = {"worst": int(m.group(2)), "op": int(m.group(3)), "wakes": int(m.group(4)), "busy": int(m.group(5))}
result = {
    "unit": "guest instructions (QEMU TCG, -icount shift=0, rdtsc deltas), median",
    "fast_path": fast,
    "slow_path": slow,
    "fast_path_eager_fpu": eager,
    "vm": vm,
    "latency": latency,
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
print()
print(f"{'timer wake-up during (bench-latency)':<{width}} {'worst':>10} {'operation':>10} {'floor':>10}")
for n, v in latency.items():
    print(f"{n:<{width}} {v['worst']:>10} {v['op']:>10} {v['busy']:>10}")
ipc = fast.get("ipc_call_reply_cross_space_0w", {}).get("median")
hc = vm.get("vm_hypercall_round_trip", {}).get("median")
if ipc and hc:
    print(f"one hypercall exit round trip = {hc / ipc:.2f} x one IPC call+reply (fast path)")
print("(guest instructions, median; JSON in target/bench/kernel.json)")
PY
echo
scripts/bench-linux.sh
echo
scripts/bench-consolidate.sh
