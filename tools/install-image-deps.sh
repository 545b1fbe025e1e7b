#!/usr/bin/env bash
# Installs the Debian packages the image tests need (tests/images), when they are missing:
#   qemu-system-x86           boots the test image (tests/images/test_boot.py)
#   busybox-static            the test image's /bin/sh, init and tools
#   syslinux syslinux-common  the test disk's bootloader (installed into a FAT image file)
#   mtools dosfstools         build the FAT boot partition; 'deparrow board provision' writes it
#   mount                     (losetup) the flash tests' loop devices
#   binutils                  (strip) keeps the test image small
#   qemu-system-arm           boots the emulated aarch64 board (tests/images/test_board_arm64.py)
#   qemu-system-misc          boots the emulated riscv64 board (OpenSBI comes with it)
#   qemu-user-static          runs aarch64 and riscv64 binaries here (busybox applets, checks)
#   gcc-aarch64-linux-gnu     cross-build the boards' MicroPython node (firmware/build.sh --arch),
#   gcc-riscv64-linux-gnu     with libc6-dev-arm64-cross and libc6-dev-riscv64-cross
# The Debian kernels and the aarch64 busybox-static are not installed: tools/build-test-image.py
# and tools/build-board-image.py download them with `apt-get download` and unpack them into
# their cache. For arm64's, dpkg must know the architecture (multiarch): this adds it and
# refreshes apt's index once. (Installing busybox-static:arm64 would replace this machine's
# /bin/busybox, so nothing of arm64 is installed.)
# Debian's cross compilers conflict with gcc-multilib, which apt then removes: what -m32 needs
# of it (the firmware's 32-bit check, tools/install-system-deps.sh) is named here to stay.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "adding dpkg's arm64 architecture (the aarch64 board image's Debian packages)" >&2
  $SUDO dpkg --add-architecture arm64
fi
arm64_index=0
if ! compgen -G "/var/lib/apt/lists/*_binary-arm64_Packages*" >/dev/null; then
  arm64_index=1
  rm -f "${TMPDIR:-/tmp}/deparrow-apt-index-refreshed"  # apt-install.sh refreshes the index
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx udhcpc || need+=(busybox-static)
command -v syslinux >/dev/null || need+=(syslinux)
[ -e /usr/lib/syslinux/mbr/mbr.bin ] || need+=(syslinux-common)
command -v mcopy >/dev/null || need+=(mtools)
command -v mkfs.vfat >/dev/null || [ -x /sbin/mkfs.vfat ] || need+=(dosfstools)
command -v losetup >/dev/null || [ -x /sbin/losetup ] || need+=(mount)
command -v strip >/dev/null || need+=(binutils)
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v qemu-system-riscv64 >/dev/null || need+=(qemu-system-misc)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
cross=0
for t in aarch64:arm64 riscv64:riscv64; do  # uname -m : Debian's name
  command -v "${t%:*}-linux-gnu-gcc" >/dev/null || { need+=("gcc-${t%:*}-linux-gnu"); cross=1; }
  # the C library's headers: only a recommendation of the compiler's package
  [ -e "/usr/${t%:*}-linux-gnu/include/stdio.h" ] || need+=("libc6-dev-${t#*:}-cross")
done
if [ $cross = 1 ] && [ "$(uname -m)" = x86_64 ] && command -v gcc >/dev/null; then
  need+=(libc6-dev-i386 "lib32gcc-$(gcc -dumpversion | cut -d. -f1)-dev")
fi
# apt-install.sh refreshes the index only with something to install
if [ "$arm64_index" = 1 ] && [ ${#need[@]} -eq 0 ]; then
  $SUDO apt-get update -qq
  touch "${TMPDIR:-/tmp}/deparrow-apt-index-refreshed"
fi

exec "$(dirname "$0")/apt-install.sh" "${need[@]}"
