#!/usr/bin/env bash
# Installs the Debian packages the image tests need (tests/images), when they are missing:
#   qemu-system-x86           boots the test image (tests/images/test_boot.py)
#   busybox-static            the test image's /bin/sh, init and tools
#   syslinux syslinux-common  the test disk's bootloader (installed into a FAT image file)
#   mtools dosfstools         build the FAT boot partition; 'deparrow board provision' writes it
#   mount                     (losetup) the flash tests' loop devices
#   binutils                  (strip) keeps the test image small
# The Debian kernel itself is not installed: tools/build-test-image.py downloads the
# linux-image-amd64 package with `apt-get download` and unpacks it into its cache.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx udhcpc || need+=(busybox-static)
command -v syslinux >/dev/null || need+=(syslinux)
[ -e /usr/lib/syslinux/mbr/mbr.bin ] || need+=(syslinux-common)
command -v mcopy >/dev/null || need+=(mtools)
command -v mkfs.vfat >/dev/null || [ -x /sbin/mkfs.vfat ] || need+=(dosfstools)
command -v losetup >/dev/null || [ -x /sbin/losetup ] || need+=(mount)
command -v strip >/dev/null || need+=(binutils)

exec "$(dirname "$0")/apt-install.sh" "${need[@]}"
