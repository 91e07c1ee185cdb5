#!/usr/bin/env bash
# The consolidation benchmark: N = 1, 2, 4 Linux compartments (scenarios/bench/consolidate-N.toml)
# run the workloads of initramfs/l4bench.c at the same time, against one native Linux running N
# copies of them (same kernel, initramfs and QEMU), all under -icount shift=0 (1 ns of guest
# time = 1 instruction, deterministic). Every copy starts its workloads at the same TSC
# (l4.start=), after all compartments have booted. Reported per N:
#   * boot: the TSC when the last compartment reaches /init, against one native boot;
#   * per workload, aggregate throughput (the sum over copies of operations per instruction
#     of wall time) in compartments against native, and fairness (the slowest copy's time over
#     the fastest's);
#   * memory overhead per compartment beyond guest RAM: the kernel memory of its VMM's factory
#     (task, page tables, threads, VM, nested page tables) and the VMM's own task pages, as the
#     root task reports them when the VMM ends.
# Writes target/bench/consolidate.json, prints a table and plots it (target/bench/consolidate.svg,
# scripts/plot-consolidate.py; docs/consolidate.svg is a copy of one run). Called by scripts/bench.sh.
# (Linux/KVM as a baseline is not measured here yet.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-linux.sh >&2
mkdir -p target/bench
counts=(1 2 4)
names=()
for n in "${counts[@]}"; do names+=("consolidate-$n" "consolidate-native-$n"); done
names+=(consolidate-share)
if ! cargo xtask test --logs target/bench "${names[@]}" >&2; then
    echo "bench-consolidate.sh: a run failed (logs in target/bench/)" >&2
    exit 1
fi
python3 - "${counts[@]}" <<'PY'
import json, re, sys
counts = [int(a) for a in sys.argv[1:]]
def read(path):
    return open(path, encoding="utf-8", errors="replace").read()
def inits(text):
    return [int(t) for t in re.findall(r"l4linux: reached /init \(tsc (\d+)\)", text)]
def runs(text):
    # workload -> list of (total, ops), one per copy
    out = {}
    for w, total, _, ops in re.findall(r"l4bench: (\w+) total=(\d+) per_op=(\d+) ops=(\d+)", text):
        out.setdefault(w, []).append((int(total), int(ops)))
    return out
native_boot = min(inits(read("target/bench/consolidate-native-1.log")))
result = {"unit": "instructions under -icount shift=0", "native_boot": native_boot, "n": []}
lines = []
for n in counts:
    comp, nat = read(f"target/bench/consolidate-{n}.log"), read(f"target/bench/consolidate-native-{n}.log")
    boots = inits(comp)
    rc, rn = runs(comp), runs(nat)
    entry = {"compartments": n, "boot_all": max(boots), "boot_ratio": max(boots) / native_boot,
             "workloads": {}}
    for w in ("cpu", "syscall", "fork_exec"):
        c, v = rc.get(w, []), rn.get(w, [])
        if len(c) != n or len(v) != n:
            print(f"bench-consolidate: {w} ran {len(c)} times in compartments and {len(v)} natively, want {n}", file=sys.stderr)
            sys.exit(1)
        agg = lambda runs: sum(ops / total for total, ops in runs)
        entry["workloads"][w] = {
            "throughput_ratio": agg(c) / agg(v),
            "fairness": max(t for t, _ in c) / min(t for t, _ in c),
            "native_fairness": max(t for t, _ in v) / min(t for t, _ in v),
        }
    held = [(int(k), int(t)) for k, t in re.findall(r"held (\d+) KiB of kernel memory and (\d+) KiB of task memory", comp)]
    entry["overhead_kib"] = {"kernel": max(k for k, _ in held), "task": max(t for _, t in held)} if held else None
    result["n"].append(entry)
# CPU shares: big (30 ms slices) and small (10 ms) run the CPU loop together from one TSC.
share = read("target/bench/consolidate-share.log")
loops = {name: int(t) for name, t in re.findall(r"\[(big|small)\] l4bench: cpu total=(\d+)", share)}
if len(loops) == 2:
    # While both run, big finishes first: in big's loop time small did (big's time - big's
    # CPU time) of work; big's share = its CPU time (one loop alone) / its elapsed loop time.
    alone = runs(read("target/bench/consolidate-native-1.log"))["cpu"][0][0]
    result["share"] = {"big_loop": loops["big"], "small_loop": loops["small"],
                       "big_share": alone / loops["big"]}
json.dump(result, open("target/bench/consolidate.json", "w"), indent=2)
print(f"{'compartments':>12} {'boot all':>9} {'cpu':>6} {'syscall':>8} {'fork+exec':>10} {'fairness':>9} {'overhead/compartment':>22}")
for e in result["n"]:
    w = e["workloads"]
    fair = max(w[k]["fairness"] for k in w)
    o = e["overhead_kib"]
    over = f"{o['kernel']} + {o['task']} KiB" if o else "-"
    print(f"{e['compartments']:>12} {e['boot_ratio']:>8.2f}x {w['cpu']['throughput_ratio']:>5.2f}x {w['syscall']['throughput_ratio']:>7.2f}x {w['fork_exec']['throughput_ratio']:>9.2f}x {fair:>9.2f} {over:>22}")
if "share" in result:
    sh = result["share"]
    print(f"CPU shares: time slices 30 ms : 10 ms -> big got {sh['big_share']:.0%} of the CPU while both ran (3:1 is 75%)")
print("(boot all: the last compartment at /init against one native boot; workloads: aggregate")
print(" throughput in compartments against N copies in one native Linux; fairness: slowest over")
print(" fastest compartment; overhead: kernel memory + VMM task memory beyond guest RAM;")
print(" JSON in target/bench/consolidate.json)")
PY
python3 scripts/plot-consolidate.py target/bench/consolidate.json target/bench/consolidate.svg
