#!/usr/bin/env bash
# Builds the guest Linux (bzImage) from Debian's linux-source-6.1 (linux-config/VERSION):
# `make tinyconfig`, then the fragments of linux-config/ merged on it (base.config; with
# --debug also debug.config), then `olddefconfig`; every fragment line must survive it. Also
# the busybox initramfs from initramfs/ (reproducible: sorted, root-owned, fixed times).
#
# Outputs: target/linux/bzImage, target/linux/config (the resolved .config), target/linux/vmlinux
# (the decompressed kernel, for direct boots),
# target/linux/initramfs.cpio.gz. The kernel build is cached under target/linux/cache/KEY/,
# KEY a hash of the exact package version and the fragments, so a second run (or a switch
# back to an earlier fragment set) costs seconds. Noise goes to target/linux/build.log, which
# is printed when a step fails.
# Usage: scripts/build-linux.sh [--debug]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/linux"
log="$out/build.log"
mkdir -p "$out"
: > "$log"
fragments=("$root/linux-config/base.config")
for arg in "$@"; do
    case "$arg" in
        --debug) fragments+=("$root/linux-config/debug.config") ;;
        *) echo "build-linux: unknown argument $arg (usage: scripts/build-linux.sh [--debug])" >&2; exit 2 ;;
    esac
done
step() { echo "[linux] $*" >&2; }
run() {
    if ! "$@" >>"$log" 2>&1; then
        echo "[linux] failed: $*; the end of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}
package=$(grep -v '^#' "$root/linux-config/VERSION" | head -1)

need=()
for p in "$package" busybox-static flex bison libelf-dev libssl-dev bc cpio gcc libc6-dev make; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    step "installing ${need[*]} (a minute or two; log: $log)"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    run $sudo apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
version=$(dpkg-query -W -f='${Version}' "$package")
key=$( { echo "$package $version"; cat "${fragments[@]}"; } | sha256sum | cut -c1-16)
cache="$out/cache/$key"
if [ -f "$cache/bzImage" ] && [ -f "$cache/config" ]; then
    step "kernel $package $version with $(basename -a "${fragments[@]}" | tr '\n' ' ')cached ($cache)"
else
    src="$out/linux-source"
    tarball=$(ls /usr/src/"$package".tar.* | head -1)
    if [ ! -f "$src/Makefile" ] || [ "$(cat "$src/.l4-source" 2>/dev/null)" != "$version" ]; then
        step "unpacking $(basename "$tarball") (about 10 s)"
        rm -rf "$src" "$out/$package"
        run tar -C "$out" -xf "$tarball"
        mv "$out/$package" "$src"
        echo "$version" > "$src/.l4-source"
    fi
    step "configuring: tinyconfig + $(basename -a "${fragments[@]}" | tr '\n' ' ')(log: $log)"
    run make -C "$src" tinyconfig
    run "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "${fragments[@]}"
    run make -C "$src" olddefconfig
    # Every line of the fragments must survive olddefconfig (a typo or a missing dependency
    # would silently drop it).
    missing=0
    for fragment in "${fragments[@]}"; do
        while IFS= read -r line; do
            case "$line" in ''|'#'*) continue ;; esac
            key_=${line%%=*}; value=${line#*=}
            if [ "$value" = n ]; then
                if grep -q "^$key_=" "$src/.config"; then
                    echo "build-linux: $(basename "$fragment"): $key_ still set" >&2; missing=1
                fi
            elif ! grep -qx "$line" "$src/.config"; then
                echo "build-linux: $(basename "$fragment"): $line not in the resolved .config" >&2; missing=1
            fi
        done < "$fragment"
    done
    [ $missing -eq 0 ] || exit 1
    step "building bzImage with $(nproc) jobs (about 5 minutes on 2 cores; log: $log)"
    start=$(date +%s)
    run make -C "$src" -j"$(nproc)" bzImage
    mkdir -p "$cache"
    cp "$src/arch/x86/boot/bzImage" "$cache/bzImage"
    cp "$src/.config" "$cache/config"
    step "built in $(( $(date +%s) - start )) s"
fi
cp "$cache/bzImage" "$out/bzImage"
cp "$cache/config" "$out/config"

# The decompressed kernel (the ELF the bzImage carries gzip-compressed, as the kernel's
# scripts/extract-vmlinux finds it) for VMMs that boot it directly and so spare each guest its
# own decompression.
step "vmlinux (the bzImage's payload, decompressed)"
python3 - "$out/bzImage" "$out/vmlinux" <<'PY'
import struct, sys, zlib
image = open(sys.argv[1], "rb").read()
setup_sects = image[0x1f1] or 4
offset, length = struct.unpack_from("<II", image, 0x248)
start = (setup_sects + 1) * 512 + offset
payload = image[start:start + length]
if payload[:2] != b"\x1f\x8b":
    sys.exit("build-linux: the bzImage's payload is not gzip (CONFIG_KERNEL_GZIP)")
elf = zlib.decompressobj(31).decompress(payload)
if elf[:4] != b"\x7fELF":
    sys.exit("build-linux: the bzImage's payload is not an ELF kernel")
open(sys.argv[2], "wb").write(elf)
PY

# initramfs: busybox-static, initramfs/init, the workloads (initramfs/l4bench.c) and the
# compartment's control tool (initramfs/l4ctl.c).
step "initramfs"
stage="$out/initramfs"
rm -rf "$stage"
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,root,etc}
cp /bin/busybox "$stage/bin/busybox"
for applet in sh true; do ln -s busybox "$stage/bin/$applet"; done
run gcc -static -O2 -Wall -Werror -o "$stage/bin/l4bench" "$root/initramfs/l4bench.c"
run gcc -static -O2 -Wall -Werror -o "$stage/bin/l4ctl" "$root/initramfs/l4ctl.c"
install -m 755 "$root/initramfs/init" "$stage/init"
# The services a compartment file can name (`service = "NAME"`, started by /init).
mkdir -p "$stage/etc/services"
install -m 755 "$root"/initramfs/services/* "$stage/etc/services/"
# Reproducible: sorted names, root owner, one fixed time stamp.
find "$stage" -exec touch -h -d @0 {} +
(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --reproducible --quiet | gzip -9n) \
    > "$out/initramfs.cpio.gz"
echo "build-linux: $out/bzImage ($(stat -c %s "$out/bzImage") bytes, config in $out/config), $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes), $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes)"
