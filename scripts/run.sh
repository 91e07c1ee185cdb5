#!/usr/bin/env bash
# The main command: installs what is missing, builds, and boots the system in QEMU with the
# serial console on this terminal. It runs the demo scenario: the root task starts a ping and a
# pong task that talk over IPC; QEMU exits when they are done.
# Usage: scripts/run.sh [scenario] [extra QEMU args...]   (scenarios: demo, test, vm, bench, linux-early, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scenario=${1:-demo}
[ $# -gt 0 ] && shift
scripts/build.sh "$scenario"
status=0
scripts/qemu.sh "target/iso/$scenario.iso" "$@" || status=$?
case $status in
    33) echo; echo "run.sh: system powered off normally (all tasks exited with 0)" ;;
    35) echo; echo "run.sh: system powered off after a task failed (see the log above)"; exit 1 ;;
    37) echo; echo "run.sh: kernel panic (see the log above)"; exit 1 ;;
    *) echo; echo "run.sh: QEMU exited with status $status"; exit 1 ;;
esac
