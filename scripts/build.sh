#!/usr/bin/env bash
# Builds the kernel and the tasks, and what each scenario boots, as scenarios.toml describes
# them: the flat kernel image and modules for QEMU's -kernel (target/direct/NAME/), or a GRUB
# ISO (target/iso/NAME.iso) for `loader = "grub"`; `cargo xtask list` lists them.
# Usage: scripts/build.sh [scenario...]   (default: every scenario whose inputs exist; a
# scenario that boots a file made elsewhere, such as linux's bzImage from
# scripts/build-linux.sh, is skipped with a note until that file exists)
# Environment: KERNEL_CMDLINE, added before each scenario's kernel command line.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo xtask build "$@"
