#!/usr/bin/env python3
"""Plot the consolidation benchmark (target/bench/consolidate.json, written by
scripts/bench-consolidate.sh) against the number of compartments N, as an SVG with four
panels: aggregate throughput in compartments against N copies in one native Linux (per
workload), the boot of all N against one native boot, the memory overhead per compartment
beyond its guest RAM, and the network transfer between pairs (MB/s per pair in virtual time,
on a logarithmic scale, with the native pairs over loopback; from N = 2: one compartment has no
pair). Each panel shows its target from DEVELOPERS.md as a dashed line. When the
JSON has the Linux/KVM baseline (key "kvm", scripts/bench-kvm.sh: the same N guests under
Linux/KVM + QEMU in the same emulated machine), each panel also draws it as dotted lines with
open markers (overhead: L1's memory per guest beyond the guest RAM it touched); the overhead
panel then has a logarithmic scale (KVM's is megabytes per guest).

Usage: scripts/plot-consolidate.py [JSON] [SVG]   (defaults: target/bench/consolidate.json,
target/bench/consolidate.svg). Python 3 only, no packages.
"""
import json
import math
import sys

source = sys.argv[1] if len(sys.argv) > 1 else "target/bench/consolidate.json"
target = sys.argv[2] if len(sys.argv) > 2 else "target/bench/consolidate.svg"
try:
    data = json.load(open(source, encoding="utf-8"))
    entries = data["n"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"plot-consolidate: cannot read {source}: {e}")
if not entries:
    sys.exit(f"plot-consolidate: {source} has no runs")

kvm = (data.get("kvm") or {}).get("n", [])
ns = sorted({e["compartments"] for e in entries} | {e["guests"] for e in kvm})
WIDTH, HEIGHT, PANEL_W, PANEL_H, LEFT, TOP = 1275, 350 if kvm else 330, 250, 200, 70, 60
COLOURS = {"cpu": "#1f77b4", "syscall": "#d62728", "fork_exec": "#2ca02c",
           "boot": "#9467bd", "kernel": "#8c564b", "task": "#ff7f0e", "total": "#333333",
           "net": "#17becf", "native": "#7f7f7f"}
title = "Linux compartments on the L4 kernel against native Linux"
if kvm:
    title += " and Linux/KVM"
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
       f'font-family="sans-serif" font-size="12">',
       f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
       f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{title} '
       f'(QEMU -icount shift=0; consolidation benchmark)</text>']
if kvm:
    # What the two line styles are, under the panels.
    y = TOP + PANEL_H + 58
    out.append(f'<line x1="{LEFT}" x2="{LEFT + 30}" y1="{y - 4}" y2="{y - 4}" stroke="#333" '
               f'stroke-width="2"/>')
    out.append(f'<text x="{LEFT + 36}" y="{y}">L4 compartments</text>')
    out.append(f'<line x1="{LEFT + 160}" x2="{LEFT + 190}" y1="{y - 4}" y2="{y - 4}" stroke="#333" '
               f'stroke-width="2" stroke-dasharray="2,3"/>')
    out.append(f'<text x="{LEFT + 196}" y="{y}">Linux/KVM: the same guests under KVM + QEMU in the '
               f'same emulated machine ({data["kvm"].get("statistic", "")})</text>')


def panel(index, title, unit, series, target, target_label, low, high, log=False):
    """One panel: `series` is [(label, colour, [(N, y)], kvm)], `kvm` drawing the series dotted
    with open markers; `log`: a logarithmic y axis from `low` to `high`."""
    x0 = LEFT + index * (PANEL_W + 65)
    y0 = TOP

    def px(n):
        span = max(ns) - min(ns) or 1
        return x0 + (n - min(ns)) / span * PANEL_W

    def py(v):
        if log:
            v = math.log(max(v, low))
            return y0 + PANEL_H - (v - math.log(low)) / (math.log(high) - math.log(low)) * PANEL_H
        return y0 + PANEL_H - (v - low) / (high - low) * PANEL_H

    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 - 12}" text-anchor="middle" '
               f'font-weight="bold">{title}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
               f'stroke="#999"/>')
    # Grid: five steps, or on a log scale one per factor of `log` (4: KiB, labelled in KiB or
    # MiB; 10: plain numbers).
    base = log if log else 4
    steps = round(math.log(high / low, base)) if log else 4
    for k in range(steps + 1):
        v = low * base ** k if log else low + (high - low) * k / 4
        if log == 4:
            text = f"{v / 1024:g} M" if v >= 1024 else f"{v:g} K"
        else:
            text = f"{v:g}"
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                   f'stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{text}</text>')
    for n in ns:
        out.append(f'<text x="{px(n):.1f}" y="{y0 + PANEL_H + 16}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 + PANEL_H + 34}" text-anchor="middle">'
               f'compartments (N); {unit}</text>')
    if target is not None:
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{py(target):.1f}" '
                   f'y2="{py(target):.1f}" stroke="#555" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{x0 + PANEL_W - 4}" y="{py(target) - 4:.1f}" text-anchor="end" '
                   f'fill="#555">{target_label}</text>')
    labels = 0
    for label, colour, points, dotted in series:
        if not points:
            continue
        line = " ".join(f"{px(n):.1f},{py(y):.1f}" for n, y in points)
        dash = ' stroke-dasharray="2,3"' if dotted else ""
        out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"'
                   f'{dash}/>')
        for n, y in points:
            fill = "white" if dotted else colour
            out.append(f'<circle cx="{px(n):.1f}" cy="{py(y):.1f}" r="3" fill="{fill}" '
                       f'stroke="{colour}"/>')
        if label:
            out.append(f'<text x="{x0 + 8}" y="{y0 + 16 + 15 * labels}" fill="{colour}">{label}</text>')
            labels += 1


def compartments(figure):
    return [(e["compartments"], figure(e)) for e in entries]


def guests(figure):
    return [(e["guests"], figure(e)) for e in kvm]


ratio = lambda w: lambda e: e["workloads"][w]["throughput_ratio"]
throughput = []
for w, label in (("cpu", "CPU"), ("syscall", "syscall"), ("fork_exec", "fork+exec")):
    throughput += [(label, COLOURS[w], compartments(ratio(w)), False),
                   (None, COLOURS[w], guests(ratio(w)), True)]
ys = [y for _, _, points, _ in throughput for _, y in points]
panel(0, "Aggregate throughput", "x native", throughput, 0.95, "target 0.95x",
      min(0.8, math.floor(min(ys) * 0.95 * 20) / 20), max(1.1, math.ceil(max(ys) * 1.02 * 20) / 20))
boot = lambda e: e["boot_ratio"]
boots = [y for _, y in compartments(boot) + guests(boot)]
panel(1, "All N booted", "x one native boot", [
    ("boot all", COLOURS["boot"], compartments(boot), False),
    (None, COLOURS["boot"], guests(boot), True),
], 1.5, "target 1.5x", 0, max(2.0, 2 * math.ceil(max(boots) * 1.1 / 2)))
kernel = compartments(lambda e: (e.get("overhead_kib") or {}).get("kernel", 0))
task = compartments(lambda e: (e.get("overhead_kib") or {}).get("task", 0))
total = [(n, k + t) for (n, k), (_, t) in zip(kernel, task)]
kvm_total = guests(lambda e: e["overhead_kib"]["l1"])
if kvm:
    # Compartments below a megabyte, KVM's guests at megabytes: a log scale shows both (with
    # room above for the labels).
    ys = [y for _, y in kernel + task + total + kvm_total if y > 0]
    low, high = 4 ** math.floor(math.log(min(ys) * 0.8, 4)), 4 ** math.ceil(math.log(max(ys) * 6, 4))
    panel(2, "Overhead per compartment", "KiB beyond guest RAM", [
        ("kernel memory", COLOURS["kernel"], kernel, False),
        ("VMM task memory", COLOURS["task"], task, False),
        ("total", COLOURS["total"], total, False),
        (None, COLOURS["total"], kvm_total, True),
    ], 2048, "target 2 MiB", low, high, log=4)
else:
    panel(2, "Overhead per compartment", "KiB beyond guest RAM", [
        ("kernel memory", COLOURS["kernel"], kernel, False),
        ("VMM task memory", COLOURS["task"], task, False),
        ("total", COLOURS["total"], total, False),
    ], 2048, "target 2 MiB", 0, max(2400, max(y for _, y in total) * 1.1))
# The network phase: MB/s per pair (virtual time), compartments, native pairs over loopback and
# Linux/KVM; N = 1 has no pair (n/a), so its points are absent.
net = lambda key: lambda e: (e.get("net") or {}).get(key)
present = lambda points: [(n, y) for n, y in points if y]
net_series = [("L4 compartments", COLOURS["net"], present(compartments(net("per_pair_mb_s"))), False),
              ("native (loopback)", COLOURS["native"], present(compartments(net("native_per_pair_mb_s"))), False),
              ("Linux/KVM" if kvm else None, COLOURS["net"], present(guests(net("per_pair_mb_s"))), True)]
ys = [y for _, _, points, _ in net_series for _, y in points]
if ys:
    low, high = 10 ** math.floor(math.log10(min(ys) * 0.8)), 10 ** math.ceil(math.log10(max(ys) * 4))
    panel(3, "Network transfer between pairs", "MB/s per pair", net_series, None, "", low, high,
          log=10)
out.append("</svg>")
with open(target, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
print(f"plot-consolidate: {target}")
