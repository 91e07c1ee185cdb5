#!/usr/bin/env bash
# The fuzzer against an old kernel: checks COMMIT out into a detached worktree, ports the
# fuzzer onto it (copies kernel/user/fuzz; for a kernel before the kernel memory issue's
# fixes: no RAM service, no `exception` module in the ABI, the old scripts/build.sh; before
# the borrowed UTCB: `l4::utcb::with_utcb` added over the old `utcb()`), boots
# seeds FIRST..FIRST+N-1 with the CI scenario's arguments, prints each boot's QEMU status and
# the kernel's panic line, then removes the worktree.
# Usage: scripts/fuzz-old-kernel.sh [COMMIT] [N] [FIRST]   (default: f7278d5 8 1)
# A panicking kernel ends QEMU with status 37; 33 means the fuzzer's seeds all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:-f7278d5}
seeds=${2:-8}
first=${3:-1}
dir=$(mktemp -d /tmp/l4-fuzz-old.XXXXXX)
rmdir "$dir"
git worktree add --detach "$dir" "$commit" >/dev/null
trap 'git worktree remove --force "$dir"' EXIT
cp -r kernel/user/fuzz "$dir/kernel/user/fuzz"
python3 - "$dir" <<'PY'
import re, sys, pathlib
d = pathlib.Path(sys.argv[1])
# The old workspace has no [workspace.lints].
toml = d / "kernel/user/fuzz/Cargo.toml"
toml.write_text(toml.read_text().split("[lints]")[0])
ws = d / "Cargo.toml"
s = ws.read_text()
if '"kernel/user/fuzz"' not in s:
    s = s.replace('    "kernel/user/ktest",', '    "kernel/user/ktest",\n    "kernel/user/fuzz",', 1)
ws.write_text(s)
main = d / "kernel/user/fuzz/src/main.rs"
s = main.read_text()
abi = (d / "kernel/user/l4/src/lib.rs").read_text()
if "pub mod parent" not in abi:
    i, j = s.index("/// RAM from the parent"), s.index("/// Whether the server answers")
    s = s[:i] + "/// RAM from the parent: this kernel's root task has no RAM service.\nfn parent_ram() -> (u64, u64) {\n    (RAM_AT, 0)\n}\n\n" + s[j:]
main.write_text(s)
# l4::rt::fault_in_image (the fuzzer faults in its image first): copy this tree's into the
# old runtime when it has none.
old_rt = d / "kernel/user/l4/src/rt.rs"
rt_text = old_rt.read_text()
if "fn fault_in_image" not in rt_text:
    new_rt = pathlib.Path("kernel/user/l4/src/rt.rs").read_text()
    i = new_rt.index("/// Fault in every page of this task's own image")
    old_rt.write_text(rt_text.rstrip("\n") + "\n\n" + new_rt[i:])
workers = d / "kernel/user/fuzz/src/workers.rs"
s = workers.read_text()
if "pub mod exception" not in (d / "kernel/abi/src/lib.rs").read_text():
    s = s.replace("    exception, Fpage,", "    Fpage,")
    s = s.replace("use l4::abi::{", "mod exception {\n    pub const WORDS: usize = 20;\n}\n\nuse l4::abi::{", 1)
workers.write_text(s)
# Before the borrowed UTCB (issue 9): the fuzzer's `with_utcb` over the old `utcb()`.
utcb = d / "kernel/user/l4/src/utcb.rs"
if "pub fn with_utcb" not in utcb.read_text():
    utcb.write_text(utcb.read_text() + "\n/// Run `f` with the current thread's UTCB (the later API, added by\n/// scripts/fuzz-old-kernel.sh).\npub fn with_utcb<T>(f: impl FnOnce(&mut Utcb) -> T) -> T {\n    f(utcb())\n}\n")
build = d / "scripts/build.sh"
if build.exists() and "modules_for()" in build.read_text():
    s = build.read_text()
    s = re.sub(r"(cargo build --release --target \"\$TARGET\" -p kernel[^>]*?)( >&2)", r"\1 -p fuzz\2", s, count=1)
    s = s.replace('        test) echo', '        fuzz) echo "fuzz:fuzz_factory_platform_seed=${FUZZ_SEED}_seeds=1_batches=10_ops=500" ;;\n        test) echo', 1)
    build.write_text(s)
PY
cd "$dir"
[ -x scripts/build.sh ] && grep -q "modules_for()" scripts/build.sh || { echo "fuzz-old-kernel.sh: $commit has no old-style scripts/build.sh; use cargo xtask there" >&2; exit 2; }
echo "fuzz-old-kernel.sh: kernel $commit ($(git log --format=%s -1 | cut -c1-80)...)"
for seed in $(seq "$first" $((first + seeds - 1))); do
    FUZZ_SEED=$seed scripts/build.sh fuzz >build.log 2>&1 || { tail -20 build.log; exit 1; }
    start=$(date +%s.%N)
    status=0
    QEMU_MEMORY=512M QEMU_TIMEOUT=300 scripts/qemu.sh target/iso/fuzz.iso >boot.log 2>&1 </dev/null || status=$?
    seconds=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}")
    where=$(grep -a '^fuzz: seed .* batch ' boot.log | tail -1 | sed 's/^fuzz: //' || true)
    panic=$(grep -a -A1 'PANIC' boot.log | tail -1 || true)
    result=$(grep -a -E '^(not )?ok 1 ' boot.log | head -1 || true)
    echo "seed $seed: QEMU status $status after ${seconds}s, last: $where; ${panic:-$result}"
done
