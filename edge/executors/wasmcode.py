"""The code section, instruction by instruction: the sites the worker rewrites before wasm3
loads a module, and the splice that rewrites them.

- memory.grow, which `memcap.py` routes through its hook;
- call_indirect's table index written in more than one byte. It is a u32 LEB since reference
  types, and LLVM pads it to five since those are on by default (LLVM 19; target feature
  call-indirect-overlong; `11 <type> 80 80 80 80 00`, e.g. clang 22, Rust 1.96). pywasm3's wasm3
  (2021) reads it as one byte and refuses every such module with "LEB encoded value
  overflow"; written as the single byte 00 it means the same. wasm3-run and the firmware
  build wasm3 with tools/wasm3-core.patch instead, which reads the u32 and refuses any table
  but 0, in the words used here.

A body with code this scanner does not know raises `Unsupported`: the caller leaves the code as
it is (wasm3 2021 knows no such code either, and says so when it compiles the function).
"""

from edge.executors.wasmbin import InvalidModule, enc_uleb, sleb, uleb


class Unsupported(Exception):
    """Code this scanner does not know: leave the module's code as it is."""


# Opcodes by immediate: none; one LEB; two LEBs (call_indirect, memarg); see `scan_body`.
_NO_IMM = set(range(0x45, 0xC5)) | {0x00, 0x01, 0x05, 0x0B, 0x0F, 0x1A, 0x1B, 0xD1}
_ONE_LEB = {0x0C, 0x0D, 0x10, 0x12, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x3F, 0xD2}
_BLOCK_TYPES = {0x40, 0x7F, 0x7E, 0x7D, 0x7C, 0x7B, 0x70, 0x6F}
_FC_LEBS = {8: 2, 9: 1, 10: 2, 11: 1, 12: 2, 13: 1, 14: 2, 15: 1, 16: 1, 17: 1}
TABLE_INDEX_RANGE = "call_indirect table index out of range"


def scan_body(b, pos, end):
    """(memory.grow instructions, call_indirect table indices longer than a byte) of one
    function body, each a list of (start, stop) offsets."""
    grows, tables = [], []
    n, pos = uleb(b, pos)
    for _ in range(n):
        _, pos = uleb(b, pos)
        pos += 1
    while pos < end:
        op = b[pos]
        start = pos
        pos += 1
        if op in _NO_IMM:
            continue
        if op in _ONE_LEB:
            _, pos = uleb(b, pos)
        elif op == 0x40:  # memory.grow
            _, pos = uleb(b, pos)
            grows.append((start, pos))
        elif op in (0x02, 0x03, 0x04):
            if b[pos] in _BLOCK_TYPES:
                pos += 1
            else:
                _, pos = sleb(b, pos)
        elif op == 0x0E:
            n, pos = uleb(b, pos)
            for _ in range(n + 1):
                _, pos = uleb(b, pos)
        elif op in (0x11, 0x13):  # call_indirect, return_call_indirect: type, table
            _, pos = uleb(b, pos)
            table = pos
            index, pos = uleb(b, pos)
            if index:
                raise InvalidModule(TABLE_INDEX_RANGE)  # wasm3 has one table
            if pos - table > 1:
                tables.append((table, pos))
        elif 0x28 <= op <= 0x3E:
            align, pos = uleb(b, pos)
            if align & 0x40:  # multi-memory: a memory index follows
                _, pos = uleb(b, pos)
            _, pos = uleb(b, pos)
        elif op in (0x41, 0x42):
            _, pos = sleb(b, pos)
        elif op == 0x43:
            pos += 4
        elif op == 0x44:
            pos += 8
        elif op == 0x1C:
            n, pos = uleb(b, pos)
            pos += n
        elif op == 0xD0:
            pos += 1
        elif op == 0xFC:
            sub, pos = uleb(b, pos)
            if sub > 17:
                raise Unsupported(f"opcode 0xfc {sub}")
            for _ in range(_FC_LEBS.get(sub, 0)):
                _, pos = uleb(b, pos)
        else:
            raise Unsupported(f"opcode 0x{op:02x}")
    return grows, tables


def scan_code(info):
    """[(body start, body end, grows, tables)] for every function body of the module (see
    `scan_body`); raises Unsupported (also for a body that runs past its end)."""
    code = info.sections.get(10)
    if not code:
        return []
    b = info.b
    out = []
    try:
        count, pos = uleb(b, code[0])
        for _ in range(count):
            size, body = uleb(b, pos)
            pos = body + size
            out.append((body, pos, *scan_body(b, body, pos)))
    except IndexError:
        raise Unsupported("a function body runs past the code section") from None
    return out


def splice_code(b, bodies):
    """Each function body, size first, with its edits applied: `bodies` is [(start, end,
    edits)], edits a list of (start, stop, replacement bytes) in order."""
    out = []
    for start, end, edits in bodies:
        parts, last = [], start
        for s, e, new in edits:
            parts += [bytes(b[last:s]), new]
            last = e
        parts.append(bytes(b[last:end]))
        new = b"".join(parts)
        out.append(enc_uleb(len(new)) + new)
    return out
