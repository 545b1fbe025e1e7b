"""wasm3-run reads every module itself before wasm3 sees it (edge/native/module.c): section
sizes, counts and name lengths that the module chooses, up to 2^64 - 1 in LEB128. Here the
runner is built with AddressSanitizer and UBSan (tools/build-wasm3-runner.sh --sanitize, cached
like the plain build) and fed
- hostile modules, each made to get past a bounds check that adds a module's number to a
  position (the sum wraps) or keeps only its low bits: each must be refused with an "invalid
  module" error, through the runner's normal way out, with no sanitizer report;
- mutations of the example jobs (wasm-jobs/*.wasm), seeded, so every run feeds the same ones:
  none may end in a sanitizer report or a crash, whatever the outcome.

The sanitizers watch the runner's own C files; wasm3's core is built as it ships (the build
script says why), so a crash inside it shows up as the runner's "crashed (SIGSEGV)" result.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "wasm-jobs"
SANITIZER_ENV = {
    # The runner caps its address space (RLIMIT_AS): an allocation past it must fail as
    # malloc does, so the runner reports "memory limit", not ASan "out of memory".
    "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}
MUTANTS = 2000  # ~17 s on 2 cores
FUZZ_SEED = 12


@pytest.fixture(scope="module")
def runner() -> Path:
    out = ROOT / "edge" / "native" / "bin" / "wasm3-run-sanitized"
    done = subprocess.run(
        [str(ROOT / "tools" / "build-wasm3-runner.sh"), "--sanitize", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, f"build-wasm3-runner.sh --sanitize failed:\n{done.stderr[-4000:]}"
    return out


class Outcome(NamedTuple):
    returncode: int
    stderr: str
    result: dict[str, Any] | None


def run_job(
    runner: Path, work: Path, module: bytes, entry: str = "_start", args: tuple[str, ...] = (),
    timeout_ms: int = 2000,
) -> Outcome:  # fmt: skip
    work.mkdir(parents=True)
    (work / "module.wasm").write_bytes(module)
    records = [("entry", entry), ("timeout_ms", str(timeout_ms)), ("memory_mb", "16")]
    records += [("arg", a) for a in args]
    (work / "job").write_bytes(
        b"".join(b"%s %d\n%s\n" % (k.encode(), len(v.encode()), v.encode()) for k, v in records)
    )
    done = subprocess.run(
        [str(runner), str(work)], capture_output=True, timeout=timeout_ms / 1000 + 20,
        env={**os.environ, **SANITIZER_ENV},
    )  # fmt: skip
    result_file = work / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    return Outcome(done.returncode, done.stderr.decode(errors="replace"), result)


def trouble(outcome: Outcome) -> str | None:
    """What went wrong in the runner itself, or None: a sanitizer report, a death by signal,
    no result, or a crash that the runner caught and reported as its result."""
    report = [
        line for line in outcome.stderr.splitlines()
        if "Sanitizer" in line or "runtime error:" in line
    ]  # fmt: skip
    if report:
        return "sanitizer report: " + " / ".join(report[:3])
    if outcome.returncode != 0:
        return f"runner exited {outcome.returncode}: {outcome.stderr[-500:]}"
    if outcome.result is None:
        return "no result.json"
    error = outcome.result.get("error") or ""
    if "runner crashed" in error:
        return error
    return None


# ---------------------------------------------------------------------------------------------
# Modules by hand


def leb(n: int) -> bytes:
    """Unsigned LEB128 of any size: numbers past 64 bits too, as a module may write them."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + leb(len(payload)) + payload


def name(text: bytes) -> bytes:
    return leb(len(text)) + text


HEADER = b"\0asm\x01\0\0\0"
TYPES = section(1, leb(1) + b"\x60\x00\x00")  # one type: () -> ()
FUNCS = section(3, leb(1) + leb(0))
CODE = section(10, leb(1) + name(b"\x00\x0b"))  # no locals; end


def with_imports(entries: bytes, count: int = 1) -> bytes:
    """A module with these import entries (after their count), then one function, exported as
    _start: a reader that believed the entries goes on to check the imports by name."""
    start = section(7, leb(1) + name(b"_start") + b"\x00" + leb(1))
    return HEADER + TYPES + section(2, leb(count) + entries) + FUNCS + start + CODE


def with_exports(entries: bytes, count: int = 1) -> bytes:
    return HEADER + TYPES + FUNCS + section(7, leb(count) + entries) + CODE


def long_leb(n: int, width: int) -> bytes:
    """n in `width` bytes (at least its own), padded with zero groups as LEB128 allows."""
    out = bytearray(leb(n))
    if width > len(out):
        out[-1] |= 0x80
        out += b"\x80" * (width - len(out) - 1) + b"\x00"
    return bytes(out)


WRAP_START = len(HEADER + TYPES) + 1 + 10  # where the payload of wrapping_section() begins


def wrapping_section(size: int) -> bytes:
    """A custom section of this size (10 bytes of LEB128) after the type section."""
    return HEADER + TYPES + b"\x00" + leb(size) + b"pad"


HOSTILE = {
    # Lengths near 2^64, where `pos + n` wrapped to a little before pos: the name got ~4 GiB
    # (its low 32 bits) and the reader stepped back into the number, then read on.
    "import module name of 2^64 - 1 bytes": (
        with_imports(leb(2**64 - 1) + b"f\x00\x00"),
        "invalid module: truncated name",
    ),
    "import field name of 2^64 - 1 bytes": (
        with_imports(name(b"env") + leb(2**64 - 1) + b"x\x00\x00"),
        "invalid module: truncated name",
    ),
    "export name of 2^64 - 1 bytes": (
        with_exports(long_leb(2**64 - 1, 11) + b"\x00"),
        "invalid module: truncated name",
    ),
    # Section sizes whose `start + size` wrapped to before the section, which was read again
    # from there (from the header: for ever).
    "section size of 2^64 - 1": (wrapping_section(2**64 - 1), "section 0 runs past the end"),
    "section size that wraps back to the header": (
        wrapping_section(2**64 - WRAP_START + 8),
        "section 0 runs past the end",
    ),
    # Past 64 bits: a reader that kept the low 64 bits saw a small, believable number.
    "section size of 2^64 + 3 (11 bytes)": (
        HEADER + b"\x00" + leb(2**64 + 3) + b"abc",
        "section 0 runs past the end",
    ),
    "name length of 2^70 + 3": (
        with_imports(leb(2**70 + 3) + b"env" + name(b"f") + b"\x00\x00"),
        "invalid module: truncated name",
    ),
    # Numbers kept in 32 bits: refused, not cut to their low 32 bits.
    "memory minimum of 2^32 + 1 pages": (
        HEADER + section(5, leb(1) + b"\x00" + leb(2**32 + 1)),
        "invalid module: a memory or table limit does not fit in 32 bits",
    ),
    "memory maximum of 2^64 - 1 pages": (
        HEADER + section(5, leb(1) + b"\x01" + leb(1) + leb(2**64 - 1)),
        "invalid module: a memory or table limit does not fit in 32 bits",
    ),
    "export index of 2^32": (
        with_exports(name(b"_start") + b"\x00" + leb(2**32)),
        "invalid module: an export's index does not fit in 32 bits",
    ),
}

# Refused before the fix too (no sum wraps); kept so that they stay refused.
REFUSED_BEFORE = {
    "name length of 0xFFFFFFFF": (
        with_imports(leb(0xFFFFFFFF) + b"env" + name(b"f") + b"\x00\x00"),
        "invalid module: truncated name",
    ),
    "name length of 2^63": (
        with_exports(leb(2**63) + b"run\x00\x00"),
        "invalid module: truncated name",
    ),
    "import count of 2^64 - 1": (
        HEADER + section(2, leb(2**64 - 1) + name(b"env") + name(b"f") + b"\x00\x00"),
        "invalid module: truncated LEB128 number",
    ),
    "export count of 2^32 + 1": (
        with_exports(name(b"_start") + b"\x00\x00", count=2**32 + 1),
        "invalid module: ",
    ),
    "truncated section size": (HEADER + b"\x01\xff\xff", "invalid module: truncated LEB128"),
    "truncated name length": (
        HEADER + b"\x02\x02\x01\x85",
        "invalid module: truncated LEB128 number",
    ),
    "section past the end": (HEADER + b"\x01\x05abcd", "section 1 runs past the end"),
    "name past the end": (
        HEADER + section(2, leb(1) + leb(200) + b"env"),
        "invalid module: truncated name",
    ),
}


@pytest.mark.parametrize("case", [*HOSTILE, *REFUSED_BEFORE])
def test_a_hostile_module_is_refused_cleanly(runner: Path, tmp_path: Path, case: str) -> None:
    module, words = {**HOSTILE, **REFUSED_BEFORE}[case]
    outcome = run_job(runner, tmp_path / "job", module)
    assert trouble(outcome) is None, trouble(outcome)
    assert outcome.result is not None
    assert outcome.result["status"] == "failed"
    assert words in outcome.result["error"], outcome.result["error"]


def test_a_refund_of_gas_does_not_overflow_the_meter(runner: Path, tmp_path: Path) -> None:
    """metering.usegas takes a signed cost: -1 reported by an unmetered job (gas_left at its
    top) overflowed the signed counter, undefined behaviour."""
    module = (
        HEADER
        + section(1, leb(2) + b"\x60\x01\x7f\x00" + b"\x60\x00\x00")
        + section(2, leb(1) + name(b"metering") + name(b"usegas") + b"\x00\x00")
        + section(3, leb(1) + leb(1))
        + section(7, leb(1) + name(b"_start") + b"\x00" + leb(1))
        + section(10, leb(1) + name(b"\x00\x41\x7f\x10\x00\x41\x7f\x10\x00\x0b"))
    )
    outcome = run_job(runner, tmp_path / "job", module)
    assert trouble(outcome) is None, trouble(outcome)
    assert outcome.result is not None
    assert (outcome.result["status"], outcome.result["error"]) == ("completed", None)


# ---------------------------------------------------------------------------------------------
# Mutations of real modules

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x3FFF, 0xFFFF, 2**31, 2**32 - 1, 2**32, 2**32 + 1,
               2**63, 2**64 - 3, 2**64 - 2, 2**64 - 1, 2**64, 2**64 + 1, 2**70]  # fmt: skip


def read_leb(b: bytes | bytearray, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = b[pos]  # IndexError past the end: the caller stops there
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def sections(module: bytes) -> list[tuple[int, bytearray]]:
    """(id, payload) of each section, as far as the module holds together."""
    out, pos = [], 8
    try:
        while pos < len(module):
            size, start = read_leb(module, pos + 1)
            out.append((module[pos], bytearray(module[start : start + size])))
            pos = start + size
    except IndexError:
        pass
    return out


def numbers(sid: int, payload: bytes | bytearray) -> list[tuple[int, int]]:
    """(offset, length) of the LEB128 numbers in a payload that the runner's reader trusts: the
    counts, name lengths, limits and indices of the import, memory and export sections."""
    found: list[tuple[int, int]] = []

    def read(pos: int) -> tuple[int, int]:
        value, end = read_leb(payload, pos)
        found.append((pos, end - pos))
        return value, end

    try:
        count, p = read(0)
        for _ in range(count if sid in (2, 7) else min(count, 1) if sid == 5 else 0):
            if sid != 5:
                for _ in range(2 if sid == 2 else 1):
                    n, p = read(p)
                    p += n
                kind = payload[p]
                p += 1
            if sid == 7 or (sid == 2 and kind == 0):
                _, p = read(p)
            elif sid == 5 or kind in (1, 2):
                p += sid == 2 and kind == 1
                flags = payload[p]
                _, p = read(p + 1)
                if flags & 1:
                    _, p = read(p)
            else:
                p += 2
    except IndexError:
        pass
    return found


def mutate_bytes(b: bytearray, rng: random.Random, trusted: list[tuple[int, int]]) -> None:
    """One change to b: a trusted number made large or small, or bytes flipped, set, cut,
    duplicated or inserted."""
    how = rng.choice((0, 0, 0, 1, 2, 3, 4, 5, 6)) if trusted else rng.randrange(1, 7)
    at = rng.randrange(len(b) + 1)
    if how == 0:
        off, width = rng.choice(trusted)
        if rng.random() < 0.3:  # where `pos + value` wraps to just before pos
            value = 2**64 - rng.randrange(1, 17)
        else:
            value = rng.choice([*INTERESTING, len(b) - off, len(b) - off + 1, 2**64 - off])
        if off + width <= len(b):
            b[off : off + width] = long_leb(value, len(leb(value)) + rng.choice((0, 0, 1, 2)))
    elif how == 1 and at < len(b):
        b[at] ^= 1 << rng.randrange(8)
    elif how == 2 and at < len(b):
        b[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
    elif how == 3:
        del b[at:]
    elif how == 4:
        del b[at : at + rng.randrange(1, 16)]
    elif how == 5:
        b[at:at] = b[at : at + rng.randrange(1, 32)]
    else:
        b[at:at] = leb(rng.choice(INTERESTING)) + bytes(rng.randrange(256) for _ in range(4))


def mutate(module: bytes, rng: random.Random) -> bytes:
    """A mutant of a module. Mostly changes inside one section whose size is then set to fit,
    so the mutant gets past the section sizes to the entries the reader trusts; otherwise
    changes to the raw bytes, section sizes included, or to the list of sections."""
    parts = sections(module)
    mode = rng.random()
    if mode < 0.7 and parts:
        read = [part for part in parts if part[0] in (2, 5, 7)]  # what the runner reads itself
        sid, payload = rng.choice(read if read and rng.random() < 0.7 else parts)
        for _ in range(rng.choice((1, 1, 2, 3))):
            mutate_bytes(payload, rng, numbers(sid, payload))
    elif mode < 0.8 and parts:
        i = rng.randrange(len(parts))
        op = rng.randrange(3)
        if op == 0:
            del parts[i]
        elif op == 1:
            parts.insert(rng.randrange(len(parts) + 1), parts[i])
        else:
            parts.insert(i, (rng.randrange(14), bytearray(rng.randrange(256) for _ in range(8))))
    else:
        raw = bytearray(module)
        for _ in range(rng.choice((1, 1, 2, 3))):
            mutate_bytes(raw, rng, [])
        raw[:8] = HEADER  # past the magic: the bytes after it are what a reader must survive
        return bytes(raw)
    return HEADER + b"".join(section(sid, bytes(payload)) for sid, payload in parts)


def seeds() -> list[tuple[str, bytes, str, tuple[str, ...]]]:
    """The example jobs that end on their own, with small arguments: (name, module, entry,
    args)."""
    out = []
    for job_name, spec in json.loads((JOBS / "jobs.json").read_text()).items():
        if job_name in ("loop", "sieve-bad-arg"):
            continue
        args = tuple("10" if a.isdigit() else a for a in spec["args"])
        out.append((job_name, (JOBS / spec["module"]).read_bytes(), spec["entrypoint"], args))
    return out


def test_mutated_modules_never_crash_the_runner(runner: Path, tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED)
    base = seeds()
    cases = []
    for i in range(MUTANTS):
        job_name, module, entry, args = base[i % len(base)]
        if rng.random() < 0.5:  # the runner then lists every function export it read
            entry = "missing"
        cases.append((f"{job_name}-{i}", mutate(module, rng), entry, args))

    def one(case: tuple[str, bytes, str, tuple[str, ...]]) -> tuple[str, str | None]:
        case_id, module, entry, args = case
        outcome = run_job(runner, tmp_path / case_id, module, entry, args, timeout_ms=300)
        problem = trouble(outcome)
        if problem is None:
            shutil.rmtree(tmp_path / case_id)
        return case_id, problem

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        problems = [(c, p) for c, p in pool.map(one, cases) if p]
    assert not problems, (
        f"{len(problems)} of {len(cases)} mutants broke the runner (module.wasm of each under "
        f"{tmp_path}):\n" + "\n".join(f"{c}: {p}" for c, p in problems[:20])
    )
