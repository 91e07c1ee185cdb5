#!/usr/bin/env bash
# The consolidation benchmark: N = 1, 2, 4, 8 Linux compartments (scenarios/bench/consolidate-N.toml)
# run the workloads of initramfs/l4bench.c at the same time, against one native Linux running N
# copies of them (same kernel, initramfs and QEMU), all under -icount shift=0 (1 ns of guest
# time = 1 instruction, deterministic). Every copy starts its workloads at the same TSC
# (l4.start=), after all compartments have booted. Reported per N:
#   * boot: the TSC when the last compartment reaches /init, against one native boot;
#   * per workload, aggregate throughput (the sum over copies of operations per instruction
#     of wall time) in compartments against native, and fairness (the slowest copy's time over
#     the fastest's);
#   * the network phase (N >= 2): one TCP transfer per pair of compartments (c1 to c2, c3 to c4,
#     ..., each pair on a switch of its own), against the same pairs over loopback in one native
#     Linux: aggregate throughput against native and MB/s per pair (n/a for N = 1);
#   * memory overhead per compartment beyond guest RAM: the kernel memory of its VMM's factory
#     (task, page tables, threads, VM, nested page tables) and the VMM's own task pages, as the
#     root task reports them when the VMM ends.
# Then the Linux/KVM baseline: the same N guests under Linux/KVM + QEMU inside the same emulated
# machine (scripts/bench-kvm.sh, target/bench/consolidate-kvm.json; BENCH_KVM=0 skips running it,
# an earlier run's JSON is still shown); its figures go into the JSON under "kvm", into the
# table in parentheses and into the plot as the Linux/KVM series.
# Writes target/bench/consolidate.json, prints a table and plots it (target/bench/consolidate.svg,
# scripts/plot-consolidate.py; docs/consolidate.svg is a copy of one run). Called by scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-linux.sh >&2
mkdir -p target/bench
counts=(1 2 4 8)
names=()
for n in "${counts[@]}"; do names+=("consolidate-$n" "consolidate-native-$n"); done
names+=(consolidate-share)
if ! cargo xtask test --logs target/bench "${names[@]}" >&2; then
    echo "bench-consolidate.sh: a run failed (logs in target/bench/)" >&2
    exit 1
fi
kvm_status=0
if [ "${BENCH_KVM:-1}" != 0 ]; then
    # Its own table goes to stderr; its figures come back below, next to the compartments'.
    if ! scripts/bench-kvm.sh >&2; then
        echo "bench-consolidate.sh: the Linux/KVM baseline failed (scripts/bench-kvm.sh); the table shows none" >&2
        rm -f target/bench/consolidate-kvm.json
        kvm_status=1
    fi
elif [ -f target/bench/consolidate-kvm.json ]; then
    echo "bench-consolidate.sh: BENCH_KVM=0: Linux/KVM figures from an earlier run (target/bench/consolidate-kvm.json)" >&2
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
def mb_s(copy):
    # One transfer's throughput in MB/s of virtual time (1 instruction = 1 ns): ops are KiB.
    total, kib = copy
    return kib * 1024 / total * 1000
def net(n, rc, rn):
    """The network phase: N/2 pairs, each one transfer, timed by its sender (up to the
    receiver's answer). None (n/a) without a pair."""
    if n < 2:
        for runs_ in (rc, rn):
            if runs_.get("net_send"):
                sys.exit(f"bench-consolidate: a net_send with {n} compartment(s), which have no pair")
        return None
    c, v = rc.get("net_send", []), rn.get("net_send", [])
    if len(c) != n // 2 or len(v) != n // 2:
        sys.exit(f"bench-consolidate: net_send ran {len(c)} times in compartments and {len(v)} natively, want {n // 2}")
    rates, native = [mb_s(x) for x in c], [mb_s(x) for x in v]
    return {"pairs": n // 2, "bytes_per_transfer": c[0][1] * 1024,
            "throughput_ratio": sum(rates) / sum(native),
            "per_pair_mb_s": sum(rates) / len(rates), "native_per_pair_mb_s": sum(native) / len(native),
            "aggregate_mb_s": sum(rates), "native_aggregate_mb_s": sum(native),
            "fairness": max(rates) / min(rates), "native_fairness": max(native) / min(native)}
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
    entry["net"] = net(n, rc, rn)
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
# The Linux/KVM baseline (scripts/bench-kvm.sh), when it ran: the same N guests under KVM in
# the same emulated machine, against the same native runs.
try:
    result["kvm"] = json.load(open("target/bench/consolidate-kvm.json", encoding="utf-8"))
except OSError:
    pass
json.dump(result, open("target/bench/consolidate.json", "w"), indent=2)
kvm = {e["guests"]: e for e in result.get("kvm", {}).get("n", [])}
def cell(text, n, figure):
    # A compartment figure, with the Linux/KVM one for the same N in parentheses.
    k = kvm.get(n)
    return f"{text} ({figure(k)})" if k else text
kvm_fair = lambda k: f"{max(v['fairness'] for v in k['workloads'].values()):.2f}"
header = (f"{'compartments':>12} {'boot all':>15} {'cpu':>13} {'syscall':>13} {'fork+exec':>13} "
          f"{'net: all, MB/s/pair':>26} {'fairness':>12} {'overhead/compartment':>32}" if kvm else
          f"{'compartments':>12} {'boot all':>9} {'cpu':>6} {'syscall':>8} {'fork+exec':>10} "
          f"{'net: all, MB/s/pair':>19} {'fairness':>9} {'overhead/compartment':>22}")
def net_text(figures):
    # Aggregate throughput against native, and the absolute per pair; n/a without pairs.
    if not figures:
        return "n/a"
    r = figures["throughput_ratio"]
    return f"{r:.{2 if r >= 0.1 else 3}f}x {figures['per_pair_mb_s']:.1f}"
print(header)
for e in result["n"]:
    w, n = e["workloads"], e["compartments"]
    fair = max(w[k]["fairness"] for k in w)
    o = e["overhead_kib"]
    over = f"{o['kernel']} + {o['task']} KiB" if o else "-"
    ratio = lambda name: lambda k: f"{k['workloads'][name]['throughput_ratio']:.2f}x"
    cells = [cell(f"{e['boot_ratio']:.2f}x", n, lambda k: f"{k['boot_ratio']:.2f}x"),
             cell(f"{w['cpu']['throughput_ratio']:.2f}x", n, ratio("cpu")),
             cell(f"{w['syscall']['throughput_ratio']:.2f}x", n, ratio("syscall")),
             cell(f"{w['fork_exec']['throughput_ratio']:.2f}x", n, ratio("fork_exec")),
             cell(net_text(e["net"]), n, lambda k: net_text(k.get("net"))),
             cell(f"{fair:.2f}", n, kvm_fair),
             cell(over, n, lambda k: f"{k['overhead_kib']['l1'] / 1024:.1f} MiB")]
    if kvm:
        print(f"{n:>12} {cells[0]:>15} {cells[1]:>13} {cells[2]:>13} {cells[3]:>13} {cells[4]:>26} {cells[5]:>12} {cells[6]:>32}")
    else:
        print(f"{n:>12} {cells[0]:>9} {cells[1]:>6} {cells[2]:>8} {cells[3]:>10} {cells[4]:>19} {cells[5]:>9} {cells[6]:>22}")
if "share" in result:
    sh = result["share"]
    print(f"CPU shares: time slices 30 ms : 10 ms -> big got {sh['big_share']:.0%} of the CPU while both ran (3:1 is 75%)")
print("(boot all: the last compartment at /init against one native boot; workloads: aggregate")
print(" throughput in compartments against N copies in one native Linux; fairness: slowest over")
print(" fastest compartment; overhead: kernel memory + VMM task memory beyond guest RAM;")
nets = [e["net"] for e in result["n"] if e["net"]]
if nets:
    print(f" net: a TCP transfer of {nets[0]['bytes_per_transfer'] >> 20} MiB per pair of compartments (c1 to c2, ...,")
    print(" each pair on a switch of its own), aggregate throughput against the same pairs over")
    print(" loopback in one native Linux, then MB/s per pair in virtual time (1 instruction = 1 ns);")
    print(" native per pair: " + ", ".join(f"N = {e['compartments']} {e['net']['native_per_pair_mb_s']:.0f}" for e in result["n"] if e["net"]) + " MB/s;")
print(" JSON in target/bench/consolidate.json)")
if kvm:
    print("(in parentheses: the same N guests under Linux/KVM + QEMU in the same emulated machine,")
    print(f" {result['kvm']['statistic']}: boot from the start of their QEMUs in L1 (L1's own boot of")
    print(f" {next(iter(kvm.values()))['l1_boot'] / native_boot:.1f}x not included), overhead per guest beyond the guest RAM it touched;")
    print(" scripts/bench-kvm.sh, target/bench/consolidate-kvm.json)")
PY
python3 scripts/plot-consolidate.py target/bench/consolidate.json target/bench/consolidate.svg
exit $kvm_status
