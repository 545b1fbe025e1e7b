"""Runs the test_* functions of one script of the edge core suite, on whichever interpreter
runs it: MicroPython's unix port or CPython (tests/edge/test_micropython_node.py runs every
script on both). Plain asserts, no pytest: the suite must run where pytest cannot. Settings
come from the environment (MicroPython has no argparse on boards): DP_MQTT_URL, DP_FIXTURES,
DP_WASM_JOBS, DP_WORK.
"""

import sys

try:
    import os
except ImportError:  # pragma: no cover
    import uos as os

from edge.core import compat


def setting(name):
    value = os.getenv(name)
    assert value, name + " is not set: run this script through tests/edge/test_micropython_node.py"
    return value


def read(path):
    with open(path, "rb") as f:
        return f.read()


def fixture(name):
    """A built test module: tests/edge/fixtures/<name>.wat or .c, compiled by the driver."""
    return read(setting("DP_FIXTURES") + "/" + name + ".wasm")


def wasm_job(name):
    return read(setting("DP_WASM_JOBS") + "/" + name)


def eventually(what, check, timeout_ms=20000, step=None):
    """Calls step() (if any) and check() until check() returns something true."""
    start = compat.ticks_ms()
    while True:
        if step is not None:
            step()
        value = check()
        if value:
            return value
        assert compat.ticks_diff(compat.ticks_ms(), start) < timeout_ms, "timed out: " + what
        compat.sleep_ms(2)


def _print_exception(e):
    if hasattr(sys, "print_exception"):  # MicroPython
        sys.print_exception(e)
    else:
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__)


def run(namespace):
    """Runs every test_* function in namespace (a module's globals()), in name order; exits 1
    when one failed. DP_ONLY=name runs just that one."""
    only = os.getenv("DP_ONLY")
    names = sorted([k for k in namespace if k.startswith("test_") and (not only or k == only)])
    failed = []
    for name in names:
        try:
            namespace[name]()
            print("ok   " + name)
        except Exception as e:
            failed.append(name)
            print("FAIL " + name + ": " + repr(e))
            _print_exception(e)
    impl = sys.implementation.name
    print(impl + ": " + str(len(names) - len(failed)) + " passed, " + str(len(failed)) + " failed")
    sys.exit(1 if failed or not names else 0)
