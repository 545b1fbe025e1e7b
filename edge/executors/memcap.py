"""The memory cap of a wasm3 job, enforced by rewriting the module before wasm3 loads it: its
memory maximum becomes the job's cap, and every `memory.grow` is routed through an appended
function that traps past the cap and sets a flag (the exported global MEM_FLAG) the worker
reads after the trap, so the job fails with "memory limit", not a bare trap. Past the module's
own declared maximum, memory.grow still answers -1 as the spec says. A module with code this
scanner does not know keeps the capped maximum but gets no hook (see `Unsupported`). Kept
apart from the reader (`wasmbin.py`) because it is the one part that changes a job's bytes.
"""

from edge.executors.wasmbin import enc_sleb, enc_uleb, read_limits, sleb, uleb

MEM_FLAG = "__deparrow_memory_limit"


class Unsupported(Exception):
    """Code this scanner does not know: run the module without the memory.grow hook."""


# Opcodes by immediate: none; one LEB; two LEBs (call_indirect, memarg); see `scan_grows`.
_NO_IMM = set(range(0x45, 0xC5)) | {0x00, 0x01, 0x05, 0x0B, 0x0F, 0x1A, 0x1B, 0xD1}
_ONE_LEB = {0x0C, 0x0D, 0x10, 0x12, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x3F, 0xD2}
_BLOCK_TYPES = {0x40, 0x7F, 0x7E, 0x7D, 0x7C, 0x7B, 0x70, 0x6F}
_FC_LEBS = {8: 2, 9: 1, 10: 2, 11: 1, 12: 2, 13: 1, 14: 2, 15: 1, 16: 1, 17: 1}


def scan_grows(b, pos, end):
    """Offsets (start, stop) of every memory.grow in one function body."""
    found = []
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
            found.append((start, pos))
        elif op in (0x02, 0x03, 0x04):
            if b[pos] in _BLOCK_TYPES:
                pos += 1
            else:
                _, pos = sleb(b, pos)
        elif op == 0x0E:
            n, pos = uleb(b, pos)
            for _ in range(n + 1):
                _, pos = uleb(b, pos)
        elif op in (0x11, 0x13):
            _, pos = uleb(b, pos)
            _, pos = uleb(b, pos)
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
    return found


def _vec_append(b, start, end, item):
    n, pos = uleb(b, start)
    return enc_uleb(n + 1) + bytes(b[pos:end]) + item


def _section(sid, payload):
    return bytes([sid]) + enc_uleb(len(payload)) + payload


def cap_memory(info, cap_pages):
    """The module's bytes with its memory capped at `cap_pages`; memory.grow past the cap
    traps and sets the exported global MEM_FLAG (1: over the job's cap, 2: the host could not
    allocate). Returns (bytes, hooked)."""
    b = info.b
    if info.memory is None:
        return bytes(b), False
    flags, lo, own_max, entry = info.memory
    if flags & ~3:  # memory64 or unknown flags: wasm3 refuses these anyway
        return bytes(b), False
    limit = cap_pages if own_max is None else min(own_max, cap_pages)
    _, _, _, entry_end = read_limits(b, entry)
    mem_start, mem_end = info.sections[5]
    n, _ = uleb(b, mem_start)
    new_mem = (
        enc_uleb(n)
        + bytes([flags | 1])
        + enc_uleb(lo)
        + enc_uleb(limit)
        + bytes(b[entry_end:mem_end])
    )
    out = {5: new_mem}
    hooked = False
    try:
        code = info.sections.get(10)
        grows, bodies = [], []
        if code:
            count, pos = uleb(b, code[0])
            for _ in range(count):
                size, body = uleb(b, pos)
                bodies.append((body, body + size))
                grows.append(scan_grows(b, body, body + size))
                pos = body + size
        hooked = any(grows) and 1 in info.sections and 3 in info.sections
    except (Unsupported, IndexError):
        hooked = False
    if hooked:
        hook_idx = info.imported_funcs + info.func_count
        flag_idx = info.imported_globals + info.global_count
        call = b"\x10" + enc_uleb(hook_idx)
        new_bodies = []
        for (body, body_end), sites in zip(bodies, grows, strict=True):
            parts, last = [], body
            for start, stop in sites:
                parts += [bytes(b[last:start]), call]
                last = stop
            parts.append(bytes(b[last:body_end]))
            new = b"".join(parts)
            new_bodies.append(enc_uleb(len(new)) + new)
        set_flag = lambda v: b"\x41" + enc_sleb(v) + b"\x24" + enc_uleb(flag_idx) + b"\x00"  # noqa: E731
        # Past the module's own declared maximum memory.grow answers -1 as the spec says;
        # past the job's cap (below that maximum) the job is over its limit.
        over = b"\x41\x7f\x0f" if own_max is not None and own_max <= cap_pages else set_flag(1)
        hook = (
            b"\x01\x01\x7f"  # one local: i32 (the result of memory.grow)
            + b"\x20\x00\xad\x3f\x00\xad\x7c\x42"
            + enc_sleb(limit)
            + b"\x56"  # d + size > limit
            + b"\x04\x40"
            + over
            + b"\x0b"
            + b"\x20\x00\x40\x00\x22\x01\x41\x7f\x46"  # grow; == -1 ?
            + b"\x04\x40"
            + set_flag(2)
            + b"\x0b"
            + b"\x20\x01\x0b"
        )
        new_bodies.append(enc_uleb(len(hook)) + hook)
        out[10] = enc_uleb(len(new_bodies)) + b"".join(new_bodies)
        out[1] = _vec_append(b, *info.sections[1], b"\x60\x01\x7f\x01\x7f")
        out[3] = _vec_append(b, *info.sections[3], enc_uleb(info.type_count))
        glob = b"\x7f\x01\x41\x00\x0b"
        out[6] = _vec_append(b, *info.sections[6], glob) if 6 in info.sections else b"\x01" + glob
        exp = enc_uleb(len(MEM_FLAG)) + MEM_FLAG.encode() + b"\x03" + enc_uleb(flag_idx)
        out[7] = _vec_append(b, *info.sections[7], exp) if 7 in info.sections else b"\x01" + exp
    return _rebuild(b, out), hooked


# Known sections in the order the spec requires them (12, data count, sits before code).
_ORDER = {sid: i for i, sid in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 10, 11])}


def _rebuild(b, replaced):
    """The module with the sections in `replaced` swapped in (or added, in spec order)."""
    spans, pos = [], 8
    while pos < len(b):
        size, start = uleb(b, pos + 1)
        spans.append((b[pos], pos, start + size))
        pos = start + size
    added = sorted((s for s in replaced if s not in {sid for sid, _, _ in spans}), key=_ORDER.get)
    out = [bytes(b[:8])]
    for sid, start, end in spans:
        while sid and added and _ORDER[added[0]] < _ORDER.get(sid, 99):
            new = added.pop(0)
            out.append(_section(new, replaced[new]))
        out.append(_section(sid, replaced[sid]) if sid in replaced else bytes(b[start:end]))
    out += [_section(new, replaced[new]) for new in added]
    return b"".join(out)
