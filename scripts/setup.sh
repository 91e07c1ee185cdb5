#!/usr/bin/env bash
# Installs what the build and the QEMU runs need, skipping whatever is already there.
# Used by run.sh, test.sh and bench.sh; safe to run repeatedly.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

log() { printf '[setup] %s\n' "$*" >&2; }

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    local v
    v=$(qemu-system-x86_64 --version | head -1 | sed -E 's/.*version ([0-9]+)\.([0-9]+).*/\1 \2/')
    set -- $v
    [ "$1" -gt 9 ] || { [ "$1" -eq 9 ] && [ "$2" -ge 2 ]; }
}

need_pkgs=()
for tool in grub-mkrescue:grub-common xorriso:xorriso mformat:mtools; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_pkgs+=("${tool##*:}")
done
[ -d /usr/lib/grub/i386-pc ] || need_pkgs+=(grub-pc-bin)

if [ ${#need_pkgs[@]} -gt 0 ] || ! qemu_ok; then
    if ! qemu_ok; then
        # QEMU >= 9.2 is required (older TCG skips nested paging with guest paging off).
        # On Debian 12 it comes from bookworm-backports: add that suite to the existing
        # Debian entry, reusing the URI already configured.
        src=/etc/apt/sources.list.d/debian.sources
        if [ -f "$src" ] && grep -q '^Suites:.*bookworm-updates' "$src" \
            && ! grep -q 'bookworm-backports' "$src"; then
            log "adding bookworm-backports to $src"
            $SUDO sed -i -E '0,/^Suites:(.*)bookworm-updates/s//Suites:\1bookworm-updates bookworm-backports/' "$src"
        fi
    fi
    log "apt-get update"
    $SUDO apt-get update -qq
    if [ ${#need_pkgs[@]} -gt 0 ]; then
        log "installing ${need_pkgs[*]}"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    fi
    if ! qemu_ok; then
        log "installing qemu-system-x86 from bookworm-backports"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            -t bookworm-backports qemu-system-x86 >/dev/null \
          || $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
    fi
fi

if ! qemu_ok; then
    log "error: QEMU >= 9.2 is required (found: $(qemu-system-x86_64 --version 2>/dev/null | head -1 || echo none))"
    exit 1
fi

if command -v rustup >/dev/null 2>&1; then
    # x86_64-unknown-none: the kernel and the guests; i686-unknown-linux-gnu: the 32-bit
    # Multiboot test guest (only its prebuilt `core` is used; rust-lld links it).
    for target in x86_64-unknown-none i686-unknown-linux-gnu; do
        if ! rustup target list --installed 2>/dev/null | grep -q "^$target\$"; then
            log "rustup target add $target"
            rustup target add "$target" >&2
        fi
    done
    for comp in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$comp"; then
            log "rustup component add $comp"
            rustup component add "$comp" >&2
        fi
    done
else
    log "error: rustup not found; install Rust (https://rustup.rs) first"
    exit 1
fi
