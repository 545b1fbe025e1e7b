"""A small reader of the WebAssembly binary format: LEB128 numbers and the sections, imports,
exports and memory of a module, just what the worker needs to refuse a module up front (no
entry point, an import it cannot provide, more initial memory than the job may have) and what
`memcap.py` needs to rewrite it. It reads the bytes itself because it runs before wasm3 sees
the module.
"""

import struct


class InvalidModule(Exception):
    pass


IMPORT_KINDS = {0: "function", 1: "table", 2: "memory", 3: "global"}


def uleb(b, pos):
    result = shift = 0
    while True:
        if pos >= len(b):
            raise InvalidModule("truncated LEB128 number")
        byte = b[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def sleb(b, pos):
    result = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte & 0x40:
                result -= 1 << shift
            return result, pos


def enc_uleb(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def enc_sleb(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def read_name(b, pos):
    n, pos = uleb(b, pos)
    if pos + n > len(b):
        raise InvalidModule("truncated name")
    return bytes(b[pos : pos + n]).decode("utf-8", "replace"), pos + n


def read_limits(b, pos):
    """(flags, min, max or None, position after) of a memory or table limits entry."""
    flags = b[pos]
    lo, pos = uleb(b, pos + 1)
    hi = None
    if flags & 1:
        hi, pos = uleb(b, pos)
    return flags, lo, hi, pos


class ModuleInfo:
    """Sections, imports, exports and the memory of a module, from its bytes."""

    def __init__(self, data):
        b = memoryview(data)
        if len(b) < 8 or bytes(b[:4]) != b"\0asm":
            raise InvalidModule("not a WebAssembly binary (no \\0asm magic)")
        if bytes(b[4:8]) != b"\x01\0\0\0":
            raise InvalidModule("unsupported WebAssembly binary version")
        self.b = b
        self.sections = {}  # id -> (payload start, payload end); custom sections skipped
        self.imports = []  # (module, name, kind)
        self.exports = {}  # name -> (kind, index)
        self.memory = None  # (flags, min pages, max pages or None, offset of the entry)
        self.imported_funcs = self.imported_globals = 0
        self.func_count = self.global_count = self.type_count = 0
        pos = 8
        try:
            while pos < len(b):
                sid = b[pos]
                size, start = uleb(b, pos + 1)
                end = start + size
                if end > len(b):
                    raise InvalidModule(f"section {sid} runs past the end of the module")
                if sid:
                    self.sections[sid] = (start, end)
                    self._section(sid, start)
                pos = end
        except (IndexError, UnicodeError, struct.error) as e:
            raise InvalidModule(f"malformed section ({e})") from None

    def _section(self, sid, pos):
        b = self.b
        if sid in (1, 3, 6):  # type, function, global: only their counts matter here
            n, _ = uleb(b, pos)
            if sid == 1:
                self.type_count = n
            elif sid == 3:
                self.func_count = n
            else:
                self.global_count = n
        elif sid == 2:
            n, pos = uleb(b, pos)
            for _ in range(n):
                mod, pos = read_name(b, pos)
                name, pos = read_name(b, pos)
                kind = b[pos]
                pos += 1
                self.imports.append((mod, name, kind))
                if kind == 0:
                    _, pos = uleb(b, pos)
                    self.imported_funcs += 1
                elif kind == 1:
                    _, _, _, pos = read_limits(b, pos + 1)
                elif kind == 2:
                    _, _, _, pos = read_limits(b, pos)
                elif kind == 3:
                    pos += 2
                    self.imported_globals += 1
                else:
                    raise InvalidModule(f"unknown import kind {kind}")
        elif sid == 5:
            n, pos = uleb(b, pos)
            if n:
                flags, lo, hi, _ = read_limits(b, pos)
                self.memory = (flags, lo, hi, pos)
        elif sid == 7:
            n, pos = uleb(b, pos)
            for _ in range(n):
                name, pos = read_name(b, pos)
                kind = b[pos]
                idx, pos = uleb(b, pos + 1)
                self.exports[name] = (kind, idx)
