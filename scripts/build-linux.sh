#!/usr/bin/env bash
# Build the guest Linux (bzImage) from Debian's linux-source-6.1 with the fragment in
# linux-config/, and a busybox initramfs from initramfs/. Outputs under target/linux/.
# Not part of `scripts/test.sh` yet (it takes a few minutes); Linux boot is the next issue.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/linux"
mkdir -p "$out"
need=()
for p in linux-source-6.1 busybox-static flex bison libelf-dev libssl-dev bc cpio gcc libc6-dev make; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
src="$out/linux-source-6.1"
if [ ! -f "$src/Makefile" ]; then
    tar -C "$out" -xf /usr/src/linux-source-6.1.tar.xz
fi
fragment="$root/linux-config/l4linux.config"
if [ ! -f "$out/bzImage" ] || [ "$fragment" -nt "$out/bzImage" ]; then
    make -C "$src" -s tinyconfig
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >/dev/null
    make -C "$src" -s olddefconfig
    # Every line of the fragment must survive olddefconfig (a typo or a missing dependency
    # would silently drop it).
    missing=0
    while IFS= read -r line; do
        case "$line" in ''|'#'*) continue ;; esac
        key=${line%%=*}; value=${line#*=}
        if [ "$value" = n ]; then
            grep -q "^$key=" "$src/.config" && { echo "build-linux: $key still set" >&2; missing=1; }
        else
            grep -qx "$line" "$src/.config" || { echo "build-linux: $line not in .config" >&2; missing=1; }
        fi
    done < "$fragment"
    [ $missing -eq 0 ] || exit 1
    make -C "$src" -s -j"$(nproc)" bzImage
    cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
fi
# initramfs: busybox-static, initramfs/init and the workloads (initramfs/l4bench.c).
stage="$out/initramfs"
rm -rf "$stage"
mkdir -p "$stage"/{bin,dev,proc,sys}
cp /bin/busybox "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
ln -s busybox "$stage/bin/true"
gcc -static -O2 -Wall -Werror -o "$stage/bin/l4bench" "$root/initramfs/l4bench.c"
install -m 755 "$root/initramfs/init" "$stage/init"
(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz"
echo "build-linux: $out/bzImage ($(stat -c %s "$out/bzImage") bytes), $out/initramfs.cpio.gz"
