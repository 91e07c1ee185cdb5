#!/usr/bin/env bash
# Attaches this terminal to a compartment's own serial port: a compartment with
# `serial = "com2"` (or com3, com4) in its compartment file has its console there too, and
# `scripts/run.sh FILE` prints the Unix socket QEMU offers it on
# (target/serial/FILE-NAME.sock). What is typed here goes to that compartment only; its
# console output comes back as it is. Ctrl-] leaves (the compartment keeps running).
# Usage: scripts/attach.sh SOCKET   or   scripts/attach.sh NAME   (the one socket for NAME)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -ne 1 ]; then
    echo "usage: scripts/attach.sh SOCKET|NAME (sockets: $(ls "$root"/target/serial/*.sock 2>/dev/null | tr '\n' ' '))" >&2
    exit 2
fi
socket=$1
if [ ! -S "$socket" ]; then
    matches=("$root"/target/serial/*-"$1".sock)
    if [ ${#matches[@]} -ne 1 ] || [ ! -S "${matches[0]}" ]; then
        echo "attach: $1 is not a socket, and target/serial has no one socket for a compartment $1 (is scripts/run.sh running?)" >&2
        exit 1
    fi
    socket=${matches[0]}
fi
# The program comes as an argument: on stdin it would take the place of the terminal.
program=$(cat <<'PY'
import os, select, socket, sys, termios, tty
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(path)
except OSError as e:
    sys.exit(f"attach: cannot connect to {path}: {e}")
print(f"attach: connected to {path}; Ctrl-] leaves\r", file=sys.stderr)
fd = sys.stdin.fileno()
interactive = os.isatty(fd)
saved = termios.tcgetattr(fd) if interactive else None
try:
    if interactive:
        tty.setraw(fd)
    while True:
        ready, _, _ = select.select([fd, s], [], [])
        if s in ready:
            data = s.recv(4096)
            if not data:
                break
            os.write(sys.stdout.fileno(), data)
        if fd in ready:
            data = os.read(fd, 1024)
            if not data or b"\x1d" in data:
                break
            s.sendall(data)
finally:
    if saved is not None:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    print("\r\nattach: left", file=sys.stderr)
PY
)
exec python3 -c "$program" "$socket"
