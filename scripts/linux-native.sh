#!/usr/bin/env bash
# Baseline for the compartment boot-time target: boots the guest Linux (scripts/build-linux.sh)
# natively in the same QEMU, -icount shift=0, and reports the guest's own printk timestamp of
# "Run /init" (virtual time: 1 ns per instruction, idle periods skipped to the next timer).
# Deterministic under icount. Writes target/bench/linux-native.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-linux.sh >&2
mkdir -p target/bench
log=target/bench/linux-native.log
timeout 300 qemu-system-x86_64 -cpu max -m 256 -icount shift=0 \
    -kernel target/linux/bzImage -initrd target/linux/initramfs.cpio.gz \
    -append "console=ttyS0 panic=-1 printk.time=1" \
    -nographic -no-reboot -monitor none >"$log" 2>&1 </dev/null || true
if ! grep -q "l4linux: reached /init" "$log"; then
    echo "linux-native.sh: Linux did not reach /init; see $log" >&2
    exit 1
fi
t=$(sed -nE 's/^\[ *([0-9]+\.[0-9]+)\] Run \/init.*/\1/p' "$log" | head -1)
python3 - "$t" <<'PY'
import json, sys
seconds = float(sys.argv[1])
result = {"unit": "guest virtual ns (QEMU TCG, -icount shift=0)",
          "native_run_init_ns": round(seconds * 1e9)}
json.dump(result, open("target/bench/linux-native.json", "w"), indent=2)
print(f"native Linux reaches /init at {seconds:.6f} s virtual time ({result['native_run_init_ns']:,} ns)")
PY
