#!/usr/bin/env bash
# The main command: installs what is missing, builds the kernel, the tasks, the guest Linux and
# its initramfs (cached after the first run), and boots the system in QEMU with the serial
# console on this terminal. By default it runs the `default` scenario (scenarios/default.toml):
# two Linux compartments, alpha and beta, each booting to a shell; the console server shares
# the terminal: typing goes to alpha, Ctrl-E 2 switches to beta, Ctrl-E ? lists them. Type
# `poweroff` in each to end it (or Ctrl-A x to quit QEMU). `scripts/run.sh linux` boots a
# single compartment that owns the console.
# Usage: scripts/run.sh [scenario] [--kernel BZIMAGE] [--initrd FILE] [--append "CMDLINE"]
#                       [--mem SIZE] [extra QEMU args...]
#   scenarios (scenarios.toml; `cargo xtask list`): default, linux, demo, test, vm, bench, ...
#   --kernel/--initrd/--append/--mem boot your own Linux in the compartment of a Linux scenario
#   (or, with `multiboot`, your own Multiboot kernel: --kernel ELF32 --append --mem).
#    or: scripts/run.sh FILE.toml [extra QEMU args...]
#   boots the Linux compartments of a compartment file, e.g. scenarios/default.toml (its format:
#   the comment at its top), after scripts/build-linux.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# A compartment file is named from where the command was given (as a path from the repository).
file=""
if [[ ${1:-} == *.toml ]]; then
    file=$(realpath --relative-to="$root" -- "$1")
    shift
fi
cd "$root"
scripts/setup.sh
if [ -n "$file" ]; then
    scripts/build-linux.sh
    exec cargo xtask run "$file" "$@"
fi
scenario=${1:-default}
[ $# -gt 0 ] && shift
if grep -A4 "^\[scenario\.$scenario\]" scenarios.toml | grep -q 'made_by = "scripts/build-linux.sh"'; then
    scripts/build-linux.sh
fi
exec cargo xtask run "$scenario" "$@"
