# ruff: noqa: F821 - include/package are given by MicroPython's manifest tool
# The DEparrow node for MicroPython's unix port (a PC, or a small Linux board):
#   make -C ports/unix FROZEN_MANIFEST=path/to/firmware/manifest_unix.py \
#        USER_C_MODULES=path/to/firmware MICROPY_PY_SSL=0 MICROPY_PY_BTREE=0 MICROPY_PY_FFI=0
# (firmware/build.sh --unix runs that). The binary it makes is a node by itself:
#   micropython -m edge.mp_main --data-dir DIR --hub URL --token TOKEN

# The board's set (manifest.py), over the unix port's standard variant instead of boards/.
include("manifest.py", port_manifest="$(PORT_DIR)/variants/standard/manifest.py")

# The unix node's entry point (edge/mp_main.py: node.json in a data directory, enrollment, what
# the host offers) and the wasm3-run executor it falls back to, and takes file jobs with
# (--runner): on a frozen edge package, edge.executors can only be frozen too.
package(
    "edge",
    files=("mp_main.py", "executors/__init__.py", "executors/wasm3_cli.py"),
    base_path="..",
)
