# ruff: noqa: F821 - include/require/package/module/options are given by MicroPython's manifest tool
# The DEparrow node, frozen into MicroPython firmware (micropython-lib manifest conventions):
#   make -C ports/esp32 BOARD=ESP32_GENERIC_S3 FROZEN_MANIFEST=path/to/firmware/manifest.py \
#        USER_C_MODULES=path/to/firmware/micropython.cmake
# (firmware/build.sh runs that; the unix port takes manifest_unix.py, which includes this one).
# The frozen set is exactly what a board's node imports: the edge core, its umqtt adapter, the
# board's start-up module and its wasm3 executor. tests/firmware/test_firmware.py checks it
# against what a running node loads.

# Everything the port freezes anyway (asyncio, network helpers, ...): keeps the board stock.
# esp32 and rp2 keep that set in boards/manifest.py; the unix port has no boards/, and
# manifest_unix.py names its variant's set instead.
options.defaults(port_manifest="$(PORT_DIR)/boards/manifest.py")
include(options.port_manifest)

# micropython-lib's MQTT client, the protocol level edge/core/mqtt_umqtt.py builds on.
require("umqtt.simple")

# The edge core (edge/core/, MicroPython-subset code), unchanged from the repository, with the
# edge package's own __init__.py: the frozen modules are edge.core.session and so on.
package(
    "edge",
    files=(
        "__init__.py",
        "core/__init__.py",
        "core/compat.py",
        "core/protocol.py",
        "core/jobs.py",
        "core/session.py",
        "core/outbox.py",
        "core/jobfiles.py",
        "core/mqtt_umqtt.py",
    ),
    base_path="..",
)

# The board: boot-time configuration and Wi-Fi, the node loop, the dpwasm3 executor.
module("deparrow_board.py")
module("wasm3_exec.py")
