#!/usr/bin/env bash
# Builds the kernel and the tasks, and one bootable GRUB ISO per scenario
# (target/iso/NAME.iso), as scenarios.toml describes them; `cargo xtask list` lists them.
# Usage: scripts/build.sh [scenario...]   (default: every scenario whose inputs exist; a
# scenario that boots a file made elsewhere, such as linux-early's bzImage from
# scripts/build-linux.sh, is skipped with a note until that file exists)
# Environment: KERNEL_CMDLINE, added before each scenario's kernel command line.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo xtask build "$@"
