#!/usr/bin/env bash
# The main command: installs what is missing, builds, and boots the system in QEMU with the
# serial console on this terminal. By default it runs the demo scenario: the root task starts a
# ping and a pong task that talk over IPC; QEMU exits when they are done.
# Usage: scripts/run.sh [scenario] [extra QEMU args...]
#   scenarios (scenarios.toml; `cargo xtask list`): demo, test, vm, bench, linux-early, ...
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scenario=${1:-demo}
[ $# -gt 0 ] && shift
exec cargo xtask run "$scenario" "$@"
