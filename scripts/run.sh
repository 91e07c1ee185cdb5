#!/usr/bin/env bash
# The main command: installs what is missing, builds the kernel, the tasks, the guest Linux and
# its initramfs (cached after the first run), and boots the system in QEMU with the serial
# console on this terminal. By default it runs the `linux` scenario: one compartment whose
# Linux boots to a shell on the console; type `poweroff` to end it (or Ctrl-A x to quit QEMU).
# Usage: scripts/run.sh [scenario] [--kernel BZIMAGE] [--initrd FILE] [--append "CMDLINE"]
#                       [--mem SIZE] [extra QEMU args...]
#   scenarios (scenarios.toml; `cargo xtask list`): linux, demo, test, vm, bench, ...
#   --kernel/--initrd/--append/--mem boot your own Linux in the compartment of a Linux scenario
#   (or, with `multiboot`, your own Multiboot kernel: --kernel ELF32 --append --mem).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scenario=${1:-linux}
[ $# -gt 0 ] && shift
if grep -A4 "^\[scenario\.$scenario\]" scenarios.toml | grep -q 'made_by = "scripts/build-linux.sh"'; then
    scripts/build-linux.sh
fi
exec cargo xtask run "$scenario" "$@"
