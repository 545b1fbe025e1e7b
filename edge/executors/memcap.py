"""The memory cap of a wasm3 job, enforced by rewriting the module before wasm3 loads it: its
memory maximum becomes the job's cap, and every `memory.grow` is routed through an appended
function that traps past the cap and sets a flag (the exported global MEM_FLAG) the worker
reads after the trap, so the job fails with "memory limit", not a bare trap. Past the module's
own declared maximum, memory.grow still answers -1 as the spec says. The same single rewrite
writes every call_indirect table index in the one byte pywasm3's wasm3 reads (`wasmcode.py`
finds both kinds of site). A module with code the scanner does not know keeps the capped
maximum but gets no hook and no other change (see `wasmcode.Unsupported`). Kept apart from the
reader (`wasmbin.py`) because it is the one part that changes a job's bytes.
"""

from edge.executors.wasmbin import enc_sleb, enc_uleb, read_limits, uleb
from edge.executors.wasmcode import Unsupported, scan_code, splice_code

MEM_FLAG = "__deparrow_memory_limit"


def _vec_append(b, start, end, item):
    n, pos = uleb(b, start)
    return enc_uleb(n + 1) + bytes(b[pos:end]) + item


def _section(sid, payload):
    return bytes([sid]) + enc_uleb(len(payload)) + payload


def cap_memory(info, cap_pages):
    """The module's bytes with its memory capped at `cap_pages`; memory.grow past the cap
    traps and sets the exported global MEM_FLAG (1: over the job's cap, 2: the host could not
    allocate). On the way, every call_indirect table index is written in the one byte wasm3
    reads (see `wasmcode.py`). Returns (bytes, hooked)."""
    b = info.b
    try:
        bodies = scan_code(info)
    except Unsupported:
        bodies = []
    out = {}
    mem = info.memory
    # memory64 or unknown flags: wasm3 refuses these anyway
    capped = mem is not None and not mem[0] & ~3
    if capped:
        flags, lo, own_max, entry = mem
        limit = cap_pages if own_max is None else min(own_max, cap_pages)
        _, _, _, entry_end = read_limits(b, entry)
        mem_start, mem_end = info.sections[5]
        n, _ = uleb(b, mem_start)
        out[5] = (
            enc_uleb(n)
            + bytes([flags | 1])
            + enc_uleb(lo)
            + enc_uleb(limit)
            + bytes(b[entry_end:mem_end])
        )
    hooked = (
        capped
        and any(grows for _, _, grows, _ in bodies)
        and 1 in info.sections
        and 3 in info.sections
    )
    code = []
    if hooked or any(tables for _, _, _, tables in bodies):
        call = b"\x10" + enc_uleb(info.imported_funcs + info.func_count)
        edits = []
        for start, end, grows, tables in bodies:
            sites = [(s, e, b"\x00") for s, e in tables]
            if hooked:
                sites = sorted(sites + [(s, e, call) for s, e in grows])
            edits.append((start, end, sites))
        code = splice_code(b, edits)
    if hooked:
        flag_idx = info.imported_globals + info.global_count
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
        code.append(enc_uleb(len(hook)) + hook)
        out[1] = _vec_append(b, *info.sections[1], b"\x60\x01\x7f\x01\x7f")
        out[3] = _vec_append(b, *info.sections[3], enc_uleb(info.type_count))
        glob = b"\x7f\x01\x41\x00\x0b"
        out[6] = _vec_append(b, *info.sections[6], glob) if 6 in info.sections else b"\x01" + glob
        exp = enc_uleb(len(MEM_FLAG)) + MEM_FLAG.encode() + b"\x03" + enc_uleb(flag_idx)
        out[7] = _vec_append(b, *info.sections[7], exp) if 7 in info.sections else b"\x01" + exp
    if code:
        out[10] = enc_uleb(len(code)) + b"".join(code)
    if not out:
        return bytes(b), False
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
