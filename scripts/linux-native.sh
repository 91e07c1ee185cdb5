#!/usr/bin/env bash
# Baseline for the compartment boot-time target: boots the guest Linux (scripts/build-linux.sh)
# natively in the same QEMU (scenario linux-native in scenarios.toml), -icount shift=0, and
# reports the guest's own printk timestamp of "Run /init" (virtual time: 1 ns per instruction,
# idle periods skipped to the next timer).
# Then runs the workloads of initramfs/l4bench.c (CPU loop, getppid loop, fork+exec+wait).
# Deterministic under icount. Writes target/bench/linux-native.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-linux.sh >&2
mkdir -p target/bench
# The boot (QEMU's own -kernel/-initrd, -icount shift=0) is scenario linux-native in
# scenarios.toml; the runner leaves its serial log in target/bench/linux-native.log.
log=target/bench/linux-native.log
if ! cargo xtask test --logs target/bench linux-native >&2; then
    echo "linux-native.sh: Linux did not reach /init; see $log" >&2
    exit 1
fi
python3 - "$log" <<'PY'
import json, re, sys
text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
m = re.search(r"^\[ *(\d+\.\d+)\] Run /init", text, re.M)
if not m:
    sys.exit("linux-native.sh: no 'Run /init' timestamp in the log")
seconds = float(m.group(1))
work = {w: {"total": int(t), "per_op": int(p), "ops": int(n)}
        for w, t, p, n in re.findall(r"l4bench: (\w+) total=(\d+) per_op=(\d+) ops=(\d+)", text)}
if set(work) != {"cpu", "syscall", "fork_exec"}:
    sys.exit(f"linux-native.sh: workloads missing (got {sorted(work)})")
result = {"unit": "guest virtual ns = instructions (QEMU TCG, -icount shift=0)",
          "native_run_init_ns": round(seconds * 1e9), "workloads": work}
json.dump(result, open("target/bench/linux-native.json", "w"), indent=2)
print(f"native Linux reaches /init at {seconds:.6f} s virtual time")
for w, v in work.items():
    print(f"  {w:<10} {v['total']:>12,} total  {v['per_op']:>9,} per op  ({v['ops']:,} ops)")
print("(JSON in target/bench/linux-native.json)")
PY
