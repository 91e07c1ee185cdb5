#!/usr/bin/env bash
# Linux in a compartment against the same kernel, initramfs and command line booted natively
# by the same QEMU (scenarios linux-bench, linux-native, linux-boot, linux-native-boot):
#   * under -icount shift=0 (1 ns of guest time = 1 instruction, deterministic): the TSC when
#     /init starts (instructions since QEMU's reset: BIOS and Linux natively; GRUB, our kernel,
#     sigma0, the root task, the VMM and Linux in the compartment) and the workloads of initramfs/l4bench.c (CPU loop, getppid,
#     fork+exec+wait), and the VMM's exit counts by reason;
#   * in wall-clock time, without icount: QEMU start to exit of a boot to /init that reboots
#     at once (l4exit), median of 5 runs, native and compartment interleaved; the compartment
#     once with the native command line (console on COM1, one exit per character) and once
#     with its virtio console (console=hvc0, output in batches), and both with `quiet` added
#     to the same command line (console on COM1, only warnings and errors printed);
#   * getppid in the L4Linux mode (linux-bench-l4: every user system call through L4 IPC to a
#     syscall monitor task) beside native and guest system calls, with exits per call, against
#     SOSP'97's getpid (native 223 cycles, L4Linux 526, trampoline 753).
# Writes target/bench/linux.json and prints a table. Called by scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-linux.sh >&2
mkdir -p target/bench
if ! cargo xtask test --logs target/bench linux-native linux-bench linux-bench-l4 >&2; then
    echo "bench-linux.sh: a Linux run failed (logs in target/bench/)" >&2
    exit 1
fi
runs=5
for i in $(seq 1 $runs); do
    echo "bench-linux: wall-clock boot, run $i of $runs" >&2
    if ! cargo xtask test --logs "target/bench/wall-$i" linux-native-boot linux-boot linux-boot-hvc linux-native-boot-quiet linux-boot-quiet >&2; then
        echo "bench-linux.sh: a boot failed (logs in target/bench/wall-$i/)" >&2
        exit 1
    fi
done
python3 - "$runs" <<'PY'
import json, re, statistics, sys
runs = int(sys.argv[1])
def read(path):
    return open(path, encoding="utf-8", errors="replace").read()
def run_init(text):
    # /init prints the TSC: instructions since the machine's reset in both worlds.
    m = re.search(r"l4linux: reached /init \(tsc (\d+)\)", text)
    return int(m.group(1)) if m else None
def workloads(text):
    return {w: int(p) for w, t, p, n in re.findall(r"l4bench: (\w+) total=(\d+) per_op=(\d+) ops=(\d+)", text)}
native, compartment = read("target/bench/linux-native.log"), read("target/bench/linux-bench.log")
exits = {}
m = re.search(r"\[vmm [^]]*\] exits: (.*?);", compartment)
if m:
    for name, count in re.findall(r"([\w-]+) (\d+)", m.group(1)):
        exits[name] = int(count)
wall = {k: statistics.median(float(read(f"target/bench/wall-{i}/{k}.seconds")) for i in range(1, runs + 1))
        for k in ("linux-native-boot", "linux-boot", "linux-boot-hvc", "linux-native-boot-quiet", "linux-boot-quiet")}
rows = [("QEMU reset to /init (instructions)", run_init(native), run_init(compartment))]
wn, wc = workloads(native), workloads(compartment)
for w in ("cpu", "syscall", "fork_exec"):
    rows.append((f"{w} per operation (instructions)", wn.get(w), wc.get(w)))
rows.append((f"boot to /init and reboot, wall clock s (median of {runs})", wall["linux-native-boot"], wall["linux-boot"]))
rows.append(("  the same, compartment console on hvc0 (virtio)", wall["linux-native-boot"], wall["linux-boot-hvc"]))
rows.append(("  the same, quiet on both command lines (COM1)", wall["linux-native-boot-quiet"], wall["linux-boot-quiet"]))
phases = [{"phase": p, "exits": int(t), "ms": int(ms), "per_second": int(r), "by_reason": why}
          for p, t, ms, r, why in re.findall(r"\[vmm [^]]*\] exits in phase (\S+): (\d+) in (\d+) ms \((\d+)/s\): (.*)", compartment)]
result = {"unit": "guest ns under -icount shift=0 (= instructions) unless noted",
          "compartment_phases": phases,
          "rows": [{"name": n, "native": a, "compartment": b, "ratio": (b / a if a and b else None)} for n, a, b in rows],
          "compartment_exits": exits}
json.dump(result, open("target/bench/linux.json", "w"), indent=2)
print(f"{'Linux: native vs compartment':<55} {'native':>13} {'compartment':>13} {'ratio':>7}")
for n, a, b in rows:
    ratio = f"{b / a:.2f}x" if a and b else "-"
    fmt = (lambda v: f"{v:,.2f}") if isinstance(a, float) else (lambda v: f"{v:,}")
    print(f"{n:<55} {fmt(a) if a is not None else '-':>13} {fmt(b) if b is not None else '-':>13} {ratio:>7}")
total = sum(exits.values())
print(f"compartment exits during boot and workloads: {total:,} (" + ", ".join(f"{k} {v:,}" for k, v in exits.items() if v) + ")")
print(f"{'compartment exits by phase (icount run)':<40} {'exits':>8} {'ms':>6} {'per s':>8}  by reason")
for p in phases:
    print(f"{p['phase']:<40} {p['exits']:>8,} {p['ms']:>6} {p['per_second']:>8,}  {p['by_reason']}")
l4 = read("target/bench/linux-bench-l4.log")
wl = workloads(l4)
m = re.search(r"exits in phase syscall: (\d+) in \d+ ms \(\d+/s\): (.*)", l4)
ops = 100000
l4_exits = int(m.group(1)) / ops if m else None
m = re.search(r"exits in phase syscall: (\d+) in", compartment)
guest_exits = int(m.group(1)) / ops if m else None
split = re.search(r"L4Linux mode: per #UD exit (.*)", l4)
native_getppid, guest_getppid, l4_getppid = wn.get("syscall"), wc.get("syscall"), wl.get("syscall")
result["l4linux"] = {"getppid_native": native_getppid, "getppid_guest_syscalls": guest_getppid,
                     "getppid_l4": l4_getppid, "exits_per_call_guest": guest_exits,
                     "exits_per_call_l4": l4_exits, "vmm_handler": split.group(1) if split else None}
json.dump(result, open("target/bench/linux.json", "w"), indent=2)
print()
print(f"{'getppid (instructions; SOSP 97: cycles of getpid)':<52} {'now':>8} {'ratio':>7} {'1997':>6} {'ratio':>7}")
for name, now, old in (("native Linux", native_getppid, 223), ("compartment, guest system calls", guest_getppid, None),
                       ("compartment, L4Linux mode (1997: L4Linux)", l4_getppid, 526), ("(1997: trampoline)", None, 753)):
    r_now = f"{now / native_getppid:.2f}x" if now and native_getppid else "-"
    r_old = f"{old / 223:.2f}x" if old else "-"
    print(f"{name:<52} {now if now else '-':>8} {r_now:>7} {old if old else '-':>6} {r_old:>7}")
print(f"exits per getppid: guest system calls {guest_exits}, L4Linux mode {l4_exits}")
if split:
    print(f"L4Linux mode, VMM handler per #UD exit: {split.group(1)}")
print("(JSON in target/bench/linux.json)")
PY
