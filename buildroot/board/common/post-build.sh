#!/bin/sh
# Post-build script of every DEparrow image: $1 is TARGET_DIR, $2 the board (x86_64, aarch64,
# picoclaw). Makes the node service's places and checks that the overlay's scripts arrived.
set -eu
TARGET_DIR=$1
BOARD=${2:-}

mkdir -p "$TARGET_DIR/var/lib/deparrow" "$TARGET_DIR/boot" "$TARGET_DIR/var/log"
chmod 700 "$TARGET_DIR/var/lib/deparrow"
for f in etc/init.d/S90deparrow usr/sbin/deparrow-boot usr/share/deparrow/udhcpc.script; do
	if [ ! -x "$TARGET_DIR/$f" ]; then
		echo "post-build: $f is missing or not executable in the target; is the DEparrow" \
			"overlay in BR2_ROOTFS_OVERLAY?" >&2
		exit 1
	fi
done
# The node joins the network itself (deparrow-boot): Buildroot's ifupdown script would race it.
rm -f "$TARGET_DIR/etc/init.d/S40network"
echo "DEPARROW_BOARD=$BOARD" > "$TARGET_DIR/etc/deparrow-release"
