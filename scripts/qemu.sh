#!/usr/bin/env bash
# Boots an ISO in QEMU (TCG) with the serial console on stdout and isa-debug-exit.
# Usage: scripts/qemu.sh ISO [extra QEMU args...]
# Environment: QEMU_TIMEOUT (seconds, default none), QEMU_MEMORY (default 256M).
set -uo pipefail
iso=$1
shift
args=(-cpu max -m "${QEMU_MEMORY:-256M}" -display none -serial mon:stdio -no-reboot
      -device isa-debug-exit,iobase=0xf4,iosize=4 -cdrom "$iso" "$@")
if [ -n "${QEMU_TIMEOUT:-}" ]; then
    exec timeout --foreground -k 5 "$QEMU_TIMEOUT" qemu-system-x86_64 "${args[@]}"
else
    exec qemu-system-x86_64 "${args[@]}"
fi
