#!/usr/bin/env python3
"""Plot the consolidation benchmark (target/bench/consolidate.json, written by
scripts/bench-consolidate.sh) against the number of compartments N, as an SVG with three
panels: aggregate throughput in compartments against N copies in one native Linux (per
workload), the boot of all N against one native boot, and the memory overhead per compartment
beyond its guest RAM. Each panel shows its target from DEVELOPERS.md as a dashed line.

Usage: scripts/plot-consolidate.py [JSON] [SVG]   (defaults: target/bench/consolidate.json,
target/bench/consolidate.svg). Python 3 only, no packages.
"""
import json
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

ns = [e["compartments"] for e in entries]
WIDTH, HEIGHT, PANEL_W, PANEL_H, LEFT, TOP = 960, 330, 250, 200, 70, 60
COLOURS = {"cpu": "#1f77b4", "syscall": "#d62728", "fork_exec": "#2ca02c",
           "boot": "#9467bd", "kernel": "#8c564b", "task": "#ff7f0e", "total": "#333333"}
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
       f'font-family="sans-serif" font-size="12">',
       f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
       f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">Linux compartments on '
       f'the L4 kernel against native Linux (QEMU -icount shift=0; consolidation benchmark)</text>']


def panel(index, title, unit, series, target, target_label, low, high):
    """One panel: `series` is [(label, colour, [y per N])]."""
    x0 = LEFT + index * (PANEL_W + 65)
    y0 = TOP

    def px(n):
        span = max(ns) - min(ns) or 1
        return x0 + (n - min(ns)) / span * PANEL_W

    def py(v):
        return y0 + PANEL_H - (v - low) / (high - low) * PANEL_H

    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 - 12}" text-anchor="middle" '
               f'font-weight="bold">{title}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
               f'stroke="#999"/>')
    for k in range(5):
        v = low + (high - low) * k / 4
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                   f'stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for n in ns:
        out.append(f'<text x="{px(n):.1f}" y="{y0 + PANEL_H + 16}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{x0 + PANEL_W / 2}" y="{y0 + PANEL_H + 34}" text-anchor="middle">'
               f'compartments (N); {unit}</text>')
    if target is not None:
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{py(target):.1f}" '
                   f'y2="{py(target):.1f}" stroke="#555" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{x0 + PANEL_W - 4}" y="{py(target) - 4:.1f}" text-anchor="end" '
                   f'fill="#555">{target_label}</text>')
    for i, (label, colour, ys) in enumerate(series):
        points = " ".join(f"{px(n):.1f},{py(y):.1f}" for n, y in zip(ns, ys))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for n, y in zip(ns, ys):
            out.append(f'<circle cx="{px(n):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<text x="{x0 + 8}" y="{y0 + 16 + 15 * i}" fill="{colour}">{label}</text>')


workload = lambda w: [e["workloads"][w]["throughput_ratio"] for e in entries]
panel(0, "Aggregate throughput", "x native", [
    ("CPU", COLOURS["cpu"], workload("cpu")),
    ("syscall", COLOURS["syscall"], workload("syscall")),
    ("fork+exec", COLOURS["fork_exec"], workload("fork_exec")),
], 0.95, "target 0.95x", 0.8, 1.1)
boots = [e["boot_ratio"] for e in entries]
panel(1, "All N booted", "x one native boot", [("boot all", COLOURS["boot"], boots)], 1.5,
      "target 1.5x", 0, max(2.0, max(boots) * 1.1))
kernel = [(e.get("overhead_kib") or {}).get("kernel", 0) for e in entries]
task = [(e.get("overhead_kib") or {}).get("task", 0) for e in entries]
total = [k + t for k, t in zip(kernel, task)]
panel(2, "Overhead per compartment", "KiB beyond guest RAM", [
    ("kernel memory", COLOURS["kernel"], kernel),
    ("VMM task memory", COLOURS["task"], task),
    ("total", COLOURS["total"], total),
], 2048, "target 2 MiB", 0, max(2400, max(total) * 1.1))
out.append("</svg>")
with open(target, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
print(f"plot-consolidate: {target}")
