"""The MicroPython fixtures of tests/edge (the interpreter, wasm3-run and umqtt.simple built
and installed, the wasm test modules built) for the firmware tests."""

from tests.edge.test_micropython_node import micropython, native, wasm_fixtures

__all__ = ["micropython", "native", "wasm_fixtures"]
