#!/usr/bin/env bash
# The Linux/KVM baseline of the consolidation benchmark (scripts/bench-consolidate.sh): the
# same N = 1, 2, 4, 8 guests (target/linux/bzImage and initramfs.cpio.gz, each running the
# workloads of initramfs/l4bench.c once) under Linux/KVM + QEMU inside the same emulated
# machine. L1 is Debian's stock kernel (linux-image-6.1.0-*-amd64-unsigned, kvm-amd) with a
# busybox initramfs holding this machine's qemu-system-x86_64 and its libraries, run by QEMU
# TCG with -cpu max -smp 1 -m 4096 -icount shift=0, as the compartments and the native runs
# are: 1 ns of L1 time = 1 instruction of the emulated machine, and a guest's TSC under KVM
# ticks at L1's rate (only offset per VM), so the workloads' totals are instructions of the
# whole machine. In L1, scripts/kvm/kvmbench.c starts the N QEMUs (-accel kvm -cpu host -m 256,
# each serial console on a pair of pipes), stamps their lines with L1's TSC and, once all are
# at /init, writes one line to every console: l4.barrier=/dev/ttyS0 makes l4bench wait for it
# (the TSC barrier l4.start= cannot work across VMs). Reported per N:
#   * boot_all: instructions from the start of the N QEMUs until the last guest reaches /init
#     (kvmbench reads its line), against one native boot (target/bench/consolidate-native-1.log);
#     l1_boot: the instructions L1 itself needed up to that start (not in boot_all);
#   * per workload, aggregate throughput (the sum over guests of operations per instruction)
#     against N copies in one native Linux (target/bench/consolidate-native-N.log), and fairness
#     (slowest guest's time over the fastest's);
#   * the network phase (microvm, N >= 2): guests 2k-1 and 2k are a pair on a link of their
#     own (scripts/kvm/init), one TCP transfer each; aggregate throughput against the same pairs
#     over loopback in one native Linux, and MB/s per pair (n/a for one guest or with pc);
#   * overhead per guest beyond guest RAM: the drop of L1's free memory (MemFree and the per-CPU
#     free lists) from before the launch to all guests at /init, per guest, less the guest RAM
#     the guest has touched (the resident size of its QEMU's RAM mapping); within it each
#     QEMU's own anonymous memory outside the RAM (heap, stacks; the rest is L1 kernel memory:
#     KVM's vCPU and VM state, nested and QEMU page tables).
# Every figure is the median of BENCH_KVM_RUNS runs (3; the guests' interleaving in L1 varies a
# little even under icount: syscall +-4%, the rest +-1%).
# Writes target/bench/consolidate-kvm.json (L1's console logs:
# target/bench/consolidate-kvm-N-RUN.log).
# Installs what it needs (Debian): the kernel package is fetched with apt-get download and
# cached unpacked under target/kvm/; noise goes to target/kvm/build.log.
# Environment: BENCH_KVM_COUNTS ("1 2 4 8"), BENCH_KVM_RUNS (3), BENCH_KVM_RETRIES (2, for runs
# with a stalled guest), BENCH_KVM_TIMEOUT (seconds per L1 run, 120 + 150 N), BENCH_KVM_MACHINE
# (the guests' QEMU machine: microvm, the default, or pc as the native runs; only microvm has
# virtio-mmio, so only it links the pairs of guests for the network phase: with pc the phase is
# n/a).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/target/kvm"
log=$out/build.log
mkdir -p "$out" target/bench
: > "$log"
read -r -a counts <<< "${BENCH_KVM_COUNTS:-1 2 4 8}"
runs=${BENCH_KVM_RUNS:-3}
retries=${BENCH_KVM_RETRIES:-2}
machine=${BENCH_KVM_MACHINE:-microvm}
guest_mib=256
step() { echo "[kvm] $*" >&2; }
die() { echo "bench-kvm: $*" >&2; exit 1; }
run() {
    if ! "$@" >>"$log" 2>&1; then
        echo "[kvm] failed: $*; the end of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo

command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (scripts/setup.sh installs it)"
# The guest kernel and initramfs (cached: seconds when nothing changed).
scripts/build-linux.sh >&2
# The native baselines (bench-consolidate.sh runs them just before; standalone, the missing ones
# are run, and existing ones are taken as they are).
missing=()
for n in "${counts[@]}"; do
    [ -f "target/bench/consolidate-native-$n.log" ] || missing+=("consolidate-native-$n")
done
[ -f target/bench/consolidate-native-1.log ] || missing+=(consolidate-native-1)
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    step "native baselines ${missing[*]} (a minute)"
    cargo xtask test --logs target/bench "${missing[@]}" >&2 || die "a native run failed (logs in target/bench/)"
fi

# L1's kernel: the newest linux-image-6.1.0-*-amd64-unsigned, unpacked (kernel and the four
# modules KVM needs) into target/kvm/host-RELEASE/; once there it is reused.
host=$(ls -d "$out"/host-6.1.0-*-amd64 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$host" ] || [ ! -f "$host/.complete" ]; then
    find_package() {
        apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' | cut -d' ' -f1 | sort -V | tail -1
    }
    package=$(find_package)
    if [ -z "$package" ]; then
        step "apt-get update (log: $log)"
        run $sudo apt-get update -qq
        package=$(find_package)
    fi
    [ -n "$package" ] || die "no linux-image-6.1.0-*-amd64-unsigned package in the apt sources"
    release=${package#linux-image-}; release=${release%-unsigned}
    host="$out/host-$release"
    step "downloading $package (70 MB; log: $log)"
    rm -rf "$out/deb" "$host"
    mkdir -p "$out/deb" "$host"
    (cd "$out/deb" && run apt-get download "$package")
    deb=$(ls "$out"/deb/*.deb)
    modules="./lib/modules/$release/kernel"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$host" "./boot/vmlinuz-$release" \
        "$modules/virt/lib/irqbypass.ko" "$modules/drivers/crypto/ccp/ccp.ko" \
        "$modules/arch/x86/kvm/kvm.ko" "$modules/arch/x86/kvm/kvm-amd.ko" >>"$log" 2>&1 \
        || die "cannot unpack $deb (see $log)"
    mv "$host/boot/vmlinuz-$release" "$host/vmlinuz"
    find "$host/lib" -name '*.ko' -exec mv {} "$host/" \;
    dpkg-deb -f "$deb" Version > "$host/.complete"
    rm -rf "$host/boot" "$host/lib" "$out/deb"
fi
release=${host##*/host-}
for f in vmlinuz irqbypass.ko ccp.ko kvm.ko kvm-amd.ko; do
    [ -f "$host/$f" ] || die "$host/$f missing (remove $host to fetch it again)"
done
step "L1 kernel $release ($(cat "$host/.complete"))"

# L1's initramfs: busybox, scripts/kvm/init, kvmbench, qemu-system-x86_64 with its shared
# libraries and the firmware a pc/microvm guest boot needs (microvm without ACPI boots qboot), the KVM modules and the guest's
# kernel and initramfs. Uncompressed: L1 spends no instructions on inflating it.
step "L1 initramfs"
stage="$out/l1"
rm -rf "$stage"
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,qemu,guest,modules}
[ -x /bin/busybox ] || die "/bin/busybox missing (busybox-static; scripts/build-linux.sh installs it)"
cp /bin/busybox "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
install -m 755 scripts/kvm/init "$stage/init"
run gcc -static -O2 -Wall -Werror -o "$stage/bin/kvmbench" scripts/kvm/kvmbench.c
qemu=$(command -v qemu-system-x86_64)
mkdir -p "$stage/usr/bin"
cp "$qemu" "$stage/usr/bin/qemu-system-x86_64"
for lib in $(ldd "$qemu" | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done
for firmware in bios-256k.bin linuxboot_dma.bin kvmvapic.bin bios-microvm.bin qboot.rom; do
    found=""
    for dir in $(qemu-system-x86_64 -L help); do
        if [ -f "$dir/$firmware" ]; then found="$dir/$firmware"; break; fi
    done
    if [ -n "$found" ]; then
        cp -L "$found" "$stage/qemu/"
    elif [ "$firmware" != bios-microvm.bin ] && [ "$firmware" != qboot.rom ]; then
        die "QEMU's $firmware not found in $(qemu-system-x86_64 -L help | tr '\n' ' ')"
    fi
done
cp "$host"/*.ko "$stage/modules/"
cp target/linux/bzImage target/linux/initramfs.cpio.gz "$stage/guest/"
(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) > "$out/l1.cpio"
step "L1 initramfs $(( $(stat -c %s "$out/l1.cpio") >> 20 )) MiB"

# One L1 boot per N and run: N guests at once, then L1 powers off. Runs interleave the N (the
# order of the guests' scheduling in L1 varies a little from run to run, icount or not). Now and
# then (a few runs in a hundred here) a nested guest hangs: it falls silent after its workloads
# or during its boot (a lost timer interrupt, it seems), and kvmbench ends the run ("stalled"),
# or the whole L1 run does not end in time. Such a run is repeated (up to BENCH_KVM_RETRIES
# times, 2) and counted in the JSON ("stalled_runs").
rm -f target/bench/consolidate-kvm-*.log
for r in $(seq 1 "$runs"); do
    for n in "${counts[@]}"; do
        l1log="target/bench/consolidate-kvm-$n-$r.log"
        attempt=0
        # A run takes 25 s (N = 1) to over 10 minutes (N = 8: the network phase of four pairs
        # at once costs L1 most of it); one far beyond that has hung (see below).
        timeout_s=${BENCH_KVM_TIMEOUT:-$(( 120 + 150 * n ))}
        while :; do
            step "run $r/$runs, N = $n: L1 + $n guest(s) under KVM, -icount shift=0 (about $(( 15 * n * n / 2 + 20 * n )) s; log: $l1log)"
            start=$(date +%s)
            status=0
            timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 -cpu max -smp 1 -m 4096 \
                -icount shift=0 -nodefaults -display none -serial stdio -no-reboot \
                -kernel "$host/vmlinuz" -initrd "$out/l1.cpio" \
                -append "console=ttyS0 quiet panic=-1 kvmbench.n=$n kvmbench.mem=$guest_mib kvmbench.machine=$machine" \
                < /dev/null > "$l1log" 2>&1 || status=$?
            seconds=$(( $(date +%s) - start ))
            echo "wall_seconds=$seconds qemu_status=$status" >> "$l1log"
            hung=""
            if grep -q "kvmbench: done failed=[0-9]* stalled=1" "$l1log"; then
                hung=$(grep -o 'g[0-9]* stalled' "$l1log" | head -1)
            elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
                hung="no end within $timeout_s s"
            fi
            if [ -n "$hung" ] && [ "$attempt" -lt "$retries" ]; then
                attempt=$((attempt + 1))
                mv "$l1log" "${l1log%.log}.stalled-$attempt.log"
                step "run $r/$runs, N = $n: $hung; again (log kept: ${l1log%.log}.stalled-$attempt.log)"
                continue
            fi
            break
        done
        if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
            tail -n 30 "$l1log" >&2
            die "N = $n: L1 did not finish within $timeout_s s (BENCH_KVM_TIMEOUT; log: $l1log)"
        fi
        if ! grep -q "kvmbench: done failed=0 stalled=0" "$l1log"; then
            tail -n 30 "$l1log" >&2
            die "N = $n: a guest failed (QEMU status $status; log: $l1log)"
        fi
        step "run $r/$runs, N = $n: $seconds s"
    done
done

python3 - "$machine" "$guest_mib" "$release" "$runs" "${counts[@]}" <<'PY'
import glob, json, re, statistics, sys
machine, guest_mib, release, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
counts = [int(a) for a in sys.argv[5:]]
def read(path):
    return open(path, encoding="utf-8", errors="replace").read()
def workloads(text, prefix=""):
    # workload -> list of (total, ops), one per copy (per guest)
    out = {}
    for w, total, _, ops in re.findall(prefix + r"l4bench: (\w+) total=(\d+) per_op=(\d+) ops=(\d+)", text):
        out.setdefault(w, []).append((int(total), int(ops)))
    return out
def one(pattern, text, path):
    m = re.search(pattern, text)
    if not m:
        sys.exit(f"bench-kvm: no {pattern!r} in {path}")
    return int(m.group(1))
agg = lambda copies: sum(ops / total for total, ops in copies)
native_boot = min(int(t) for t in re.findall(r"l4linux: reached /init \(tsc (\d+)\)",
                                             read("target/bench/consolidate-native-1.log")))

def measure(n, path):
    """The figures of one L1 run with n guests."""
    text = read(path)
    launch = one(r"kvmbench: launch tsc=(\d+)", text, path)
    inits = [int(t) for t in re.findall(r"kvmbench: g\d+ at /init tsc=(\d+)", text)]
    if len(inits) != n:
        sys.exit(f"bench-kvm: {len(inits)} of {n} guests reached /init in {path}")
    m = {"l1_boot": launch, "boot_all": max(inits) - launch}
    kvm = workloads(text, r"\[g\d+\] ")
    native = workloads(read(f"target/bench/consolidate-native-{n}.log"))
    for w in ("cpu", "syscall", "fork_exec"):
        k, v = kvm.get(w, []), native.get(w, [])
        if len(k) != n or len(v) != n:
            sys.exit(f"bench-kvm: {w} ran {len(k)} times under KVM ({path}) and {len(v)} natively, want {n}")
        m[w] = agg(k) / agg(v)
        m[w + "_fairness"] = max(t for t, _ in k) / min(t for t, _ in k)
        m[w + "_native_fairness"] = max(t for t, _ in v) / min(t for t, _ in v)
    # The network phase: one transfer per pair of guests (microvm, N >= 2), timed by the sender.
    k, v = kvm.get("net_send", []), native.get("net_send", [])
    if k:
        if len(k) != n // 2 or len(v) != n // 2:
            sys.exit(f"bench-kvm: net_send ran {len(k)} times under KVM ({path}) and {len(v)} natively, want {n // 2}")
        rates = [kib * 1024 / total * 1000 for total, kib in k]
        m["net"] = sum(rates) / sum(kib * 1024 / total * 1000 for total, kib in v)
        m["net_per_pair"] = statistics.mean(rates)
        m["net_fairness"] = max(rates) / min(rates)
    # Memory: L1's free memory before the launch and with all guests at /init.
    before = one(r"kvmbench: launch tsc=\d+ free_kib=(\d+)", text, path)
    booted = one(r"kvmbench: memory booted free_kib=(\d+)", text, path)
    qemus = [(int(a), int(r)) for a, r in
             re.findall(r"kvmbench: g\d+ memory booted anon_kib=(\d+) ram_rss_kib=(\d+)", text)]
    if len(qemus) != n:
        sys.exit(f"bench-kvm: no memory figures for every guest in {path}")
    m["ram"] = statistics.mean(r for _, r in qemus)
    m["l1"] = (before - booted) / n - m["ram"]
    m["qemu"] = statistics.mean(a for a, _ in qemus)
    m["wall"] = one(r"wall_seconds=(\d+)", text, path)
    return m

result = {"unit": "instructions under -icount shift=0 (L1's TSC; the guests' TSCs tick with it)",
          "l1": f"Debian {release}, QEMU TCG -cpu max -smp 1 -m 4096 -icount shift=0",
          "guests": f"qemu-system-x86_64 -accel kvm -cpu host -smp 1 -m {guest_mib} -M {machine}",
          "runs": runs, "statistic": f"median of {runs} run(s)", "native_boot": native_boot, "n": []}
for n in counts:
    ms = [measure(n, f"target/bench/consolidate-kvm-{n}-{r}.log") for r in range(1, runs + 1)]
    med = lambda key: statistics.median(m[key] for m in ms)
    entry = {"guests": n, "l1_boot": round(med("l1_boot")), "boot_all": round(med("boot_all")),
             "boot_ratio": med("boot_all") / native_boot,
             "boot_ratio_with_l1": statistics.median(m["l1_boot"] + m["boot_all"] for m in ms) / native_boot,
             "workloads": {}}
    for w in ("cpu", "syscall", "fork_exec"):
        entry["workloads"][w] = {
            "throughput_ratio": med(w),
            "fairness": med(w + "_fairness"),
            "native_fairness": med(w + "_native_fairness"),
            "throughput_ratio_runs": [round(m[w], 4) for m in ms],
        }
    # n/a (None) without pairs: one guest, or the pc machine (no virtio-mmio for the link).
    entry["net"] = None
    if all("net" in m for m in ms):
        entry["net"] = {"pairs": n // 2, "throughput_ratio": med("net"),
                        "per_pair_mb_s": med("net_per_pair"), "fairness": med("net_fairness"),
                        "throughput_ratio_runs": [round(m["net"], 4) for m in ms]}
    elif any("net" in m for m in ms):
        sys.exit(f"bench-kvm: N = {n}: the network phase ran in some runs only")
    entry["overhead_kib"] = {"l1": round(med("l1")), "qemu": round(med("qemu")),
                             "guest_ram_resident": round(med("ram"))}
    entry["wall_seconds"] = [m["wall"] for m in ms]
    # Runs repeated because a guest stalled (their logs: consolidate-kvm-N-RUN.stalled-K.log).
    entry["stalled_runs"] = len(glob.glob(f"target/bench/consolidate-kvm-{n}-*.stalled-*.log"))
    result["n"].append(entry)
json.dump(result, open("target/bench/consolidate-kvm.json", "w"), indent=2)
print(f"{'guests':>6} {'boot all':>9} {'cpu':>6} {'syscall':>8} {'fork+exec':>10} {'net: all, MB/s/pair':>19} {'fairness':>9} {'overhead/guest':>15} {'L1 boot':>8}")
for e in result["n"]:
    w = e["workloads"]
    fair = max(w[k]["fairness"] for k in w)
    o = e["overhead_kib"]
    r = e["net"]["throughput_ratio"] if e["net"] else None
    net = f"{r:.{2 if r >= 0.1 else 3}f}x {e['net']['per_pair_mb_s']:.1f}" if e["net"] else "n/a"
    print(f"{e['guests']:>6} {e['boot_ratio']:>8.2f}x {w['cpu']['throughput_ratio']:>5.2f}x "
          f"{w['syscall']['throughput_ratio']:>7.2f}x {w['fork_exec']['throughput_ratio']:>9.2f}x "
          f"{net:>19} {fair:>9.2f} {o['l1'] / 1024:>11.1f} MiB {e['l1_boot'] / native_boot:>7.2f}x")
print(f"(Linux/KVM in the same QEMU, median of {runs} run(s): boot all: from the start of the N QEMUs")
print(" in L1 to the last guest at /init, against one native boot (L1 boot: L1 up to that start, not")
print(" included); workloads: aggregate throughput of the N guests against N copies in one native")
print(" Linux; net: one TCP transfer per pair of guests (g1 to g2, ...; a UDP socket pair in L1 as")
print(" the link), aggregate against the same pairs over loopback in one native Linux, and MB/s per")
print(" pair at 1 instruction = 1 ns; fairness: slowest over fastest guest; overhead: L1 memory per")
print(" guest beyond the guest RAM it touched; JSON in target/bench/consolidate-kvm.json)")
for e in result["n"]:
    if e["stalled_runs"]:
        print(f"(N = {e['guests']}: {e['stalled_runs']} run(s) repeated because a guest stalled)")
PY
