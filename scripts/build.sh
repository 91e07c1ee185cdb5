#!/usr/bin/env bash
# Builds the kernel and all tasks, and one bootable GRUB ISO per scenario:
#   target/iso/demo.iso   - the demo (ping/pong tasks)
#   target/iso/test.iso   - the in-QEMU conformance suite (ktest)
# Usage: scripts/build.sh [scenario...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."

# The kernel and the guest images are soft-float (x86_64-unknown-none: no SSE code); the user
# tasks may use SSE and are built for the hard-float target with .cargo/tasks.toml.
TARGET=x86_64-unknown-none
OUT=target/$TARGET/release
TASK_TARGET=x86_64-unknown-linux-gnu
TASK_OUT=target/$TASK_TARGET/release
cargo build --release --target "$TARGET" -p kernel -p guest-basic >&2
cargo --config .cargo/tasks.toml build --release --target "$TASK_TARGET" \
    -p sigma0 -p roottask -p demo -p ktest -p bench -p vmm >&2

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(demo test)

modules_for() {
    case "$1" in
        demo) echo "demo:pong demo:ping_peer=pong" ;;
        test) echo "ktest:ktest_factory_platform_io=0x40/2_superpage" ;;
        bad-module) echo "bad.elf:broken demo:pong demo:ping_peer=pong" ;;
        bad-sigma0) echo "" ;;
        bench|bench-slowpath|bench-eagerfpu) echo "bench:bench_factory_platform_superpage" ;;
                vm) echo "guest-basic:guest_data vmm:vmm_factory_blob=guest" ;;
        vm-bench) echo "guest-basic:guest_data vmm:vmm_factory_blob=guest_bench" ;;
        linux-early) echo "bzImage:linux_data vmm:vmm_factory_blob=linux_linux" ;;
        *) echo "unknown scenario $1" >&2; exit 2 ;;
    esac
}

for scenario in "${scenarios[@]}"; do
    dir=target/iso/$scenario
    rm -rf "$dir"
    mkdir -p "$dir/boot/grub"
    cp "$OUT/kernel" "$TASK_OUT/sigma0" "$TASK_OUT/roottask" "$dir/boot/"
    if [ "$scenario" = bad-sigma0 ]; then
        # Truncated ELF image as sigma0: the kernel must refuse it with a clear message.
        head -c 100 "$TASK_OUT/sigma0" > "$dir/boot/sigma0"
    fi
    {
        echo "set timeout=0"
        echo "set default=0"
        echo "menuentry \"L4 ($scenario)\" {"
        cmdline=${KERNEL_CMDLINE:-}
        [ "$scenario" = bench-slowpath ] && cmdline="$cmdline nofastpath"
        [ "$scenario" = bench-eagerfpu ] && cmdline="$cmdline eagerfpu"
        echo "    multiboot2 /boot/kernel $cmdline"
        echo "    module2 /boot/sigma0 sigma0"
        echo "    module2 /boot/roottask root"
        for spec in $(modules_for "$scenario"); do
            binary=${spec%%:*}
            args=${spec#*:}
            if [ "$binary" = bad.elf ]; then
                # An ELF header claiming a 32-bit ARM executable, then garbage.
                printf '\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00' > "$dir/boot/$binary"
                head -c 200 /dev/zero >> "$dir/boot/$binary"
            elif [ "$binary" = bzImage ]; then
                # The guest Linux from scripts/build-linux.sh.
                [ -f target/linux/bzImage ] || { echo "build.sh: no target/linux/bzImage; run scripts/build-linux.sh" >&2; exit 1; }
                cp target/linux/bzImage "$dir/boot/$binary"
            elif [ -f "$TASK_OUT/$binary" ]; then
                cp "$TASK_OUT/$binary" "$dir/boot/$binary"
            else
                cp "$OUT/$binary" "$dir/boot/$binary"
            fi
            echo "    module2 /boot/$binary ${args//_/ }"
        done
        echo "    boot"
        echo "}"
    } > "$dir/boot/grub/grub.cfg"
    # Reuse the ISO if nothing in it changed.
    iso=target/iso/$scenario.iso
    stamp=$(cd "$dir" && find . -type f -exec sha256sum {} + | sort | sha256sum | cut -c1-16)
    if [ -f "$iso" ] && [ -f "$iso.stamp" ] && [ "$(cat "$iso.stamp")" = "$stamp" ]; then
        continue
    fi
    grub-mkrescue -o "$iso" "$dir" >/dev/null 2>&1 || { echo "grub-mkrescue failed for $scenario" >&2; grub-mkrescue -o "$iso" "$dir"; exit 1; }
    echo "$stamp" > "$iso.stamp"
    echo "built $iso" >&2
done
