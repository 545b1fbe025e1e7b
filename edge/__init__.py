"""DEparrow edge runtime: the node that runs jobs (core runs on MicroPython and CPython)."""
