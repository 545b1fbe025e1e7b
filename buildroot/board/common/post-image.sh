#!/bin/sh
# Post-image script of every DEparrow image: $1 is BINARIES_DIR, $2 the board. Puts the
# deparrow/ folder (README, board.json) next to the kernel, then lays out the disk image with
# genimage from board/<board>/genimage.cfg: a FAT boot partition (DPBOOT) that
# 'deparrow board provision' writes the node's identity onto, and the root file system.
set -eu
BINARIES_DIR=$1
BOARD=${2:?post-image.sh needs the board name (BR2_ROOTFS_POST_SCRIPT_ARGS)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
CFG=$HERE/$BOARD/genimage.cfg
[ -f "$CFG" ] || { echo "post-image: no $CFG" >&2; exit 1; }

mkdir -p "$BINARIES_DIR/deparrow"
cp "$HERE/$BOARD/board.json" "$BINARIES_DIR/deparrow/board.json"
cp "$HERE/common/boot-README.txt" "$BINARIES_DIR/deparrow/README.txt"

GENIMAGE_TMP=$BUILD_DIR/genimage.tmp
ROOTPATH_TMP=$(mktemp -d)
trap 'rm -rf "$ROOTPATH_TMP"' EXIT
rm -rf "$GENIMAGE_TMP"
genimage \
	--rootpath "$ROOTPATH_TMP" \
	--tmppath "$GENIMAGE_TMP" \
	--inputpath "$BINARIES_DIR" \
	--outputpath "$BINARIES_DIR" \
	--config "$CFG"

IMG=$(sed -n 's/^image \(.*\.img\) {.*/\1/p' "$CFG" | tail -n 1)
# Clouds that want qcow2 get one when the build machine has qemu-img.
if [ "$BOARD" != picoclaw ] && command -v qemu-img > /dev/null 2>&1; then
	qemu-img convert -f raw -O qcow2 "$BINARIES_DIR/$IMG" "$BINARIES_DIR/${IMG%.img}.qcow2"
fi
echo "DEparrow $BOARD image: $BINARIES_DIR/$IMG (provision it with 'deparrow board provision')"
