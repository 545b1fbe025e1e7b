# The only place that knows CPython and MicroPython differ. Feature-detected, never
# sys.implementation-branched, so a board build can freeze this file unchanged.

try:
    import ujson as _json  # MicroPython
except ImportError:
    import json as _json

try:
    import hashlib as _hashlib
except ImportError:  # pragma: no cover - some boards ship uhashlib only
    import uhashlib as _hashlib

try:
    import binascii as _binascii
except ImportError:  # pragma: no cover
    import ubinascii as _binascii

try:
    import time as _time
except ImportError:  # pragma: no cover
    import utime as _time

try:
    import os as _os
except ImportError:  # pragma: no cover
    import uos as _os

try:
    import hmac as _hmac  # CPython; micropython-lib also provides it
except ImportError:  # pragma: no cover
    _hmac = None


try:
    import gc as _gc
except ImportError:  # pragma: no cover
    _gc = None


def heap_free():
    """Bytes free on MicroPython's heap now (after a collection), None on CPython: there the
    process grows as it needs to."""
    if _gc is None or not hasattr(_gc, "mem_free"):
        return None
    _gc.collect()
    return _gc.mem_free()


def json_dumps(obj):
    s = _json.dumps(obj)
    return s.encode() if isinstance(s, str) else s


def json_loads(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode()
    return _json.loads(data)


def sha256(data=b""):
    return _hashlib.sha256(data)


def hexlify(b):
    return _binascii.hexlify(b).decode()


def b64encode(b):
    return _binascii.b2a_base64(b).decode().replace("\n", "")


def b64decode(s):
    if isinstance(s, str):
        s = s.encode()
    return _binascii.a2b_base64(s)


def time_ms():
    """Wall-clock milliseconds since the Unix epoch (for timestamps in messages)."""
    return int(_time.time() * 1000)


if hasattr(_time, "ticks_ms"):

    def ticks_ms():
        return _time.ticks_ms()

    def ticks_diff(a, b):
        return _time.ticks_diff(a, b)

else:

    def ticks_ms():
        """Monotonic milliseconds (for intervals)."""
        return int(_time.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b


def sleep_ms(ms):
    if hasattr(_time, "sleep_ms"):
        _time.sleep_ms(ms)
    else:
        _time.sleep(ms / 1000)


def _to_bytes(x):
    return x.encode() if isinstance(x, str) else bytes(x)


def hmac_sha256_hex(key, msg):
    key = _to_bytes(key)
    msg = _to_bytes(msg)
    if _hmac is not None and hasattr(_hmac, "new"):
        return _hmac.new(key, msg, "sha256").hexdigest()
    # RFC 2104 by hand for interpreters without hmac.
    block = 64
    if len(key) > block:
        key = sha256(key).digest()
    key = key + b"\x00" * (block - len(key))
    inner = sha256(bytes([b ^ 0x36 for b in key]) + msg).digest()
    return hexlify(sha256(bytes([b ^ 0x5C for b in key]) + inner).digest())


def compare_digest(a, b):
    a = _to_bytes(a)
    b = _to_bytes(b)
    if len(a) != len(b):
        return False
    diff = 0
    for x, y in zip(a, b):
        diff |= x ^ y
    return diff == 0


def path_exists(path):
    """os.path.exists, which MicroPython's os lacks."""
    try:
        _os.stat(path)
        return True
    except OSError:
        return False
