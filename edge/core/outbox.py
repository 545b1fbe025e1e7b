# The node's durable outbox: QoS 1 messages (job events and results) that could not go to the
# broker yet, kept in an append-only file until the broker has them.
#
# MicroPython subset (a board keeps this file in flash): no typing, no dataclasses, no pathlib;
# only os, open() and edge.core.compat. Heartbeats never come here: they are QoS 0 and stale by the
# time the broker is back.
#
# The file is a sequence of records, each fully written, flushed and fsynced before append()
# returns, so a message the job runner handed over survives a crash or a power cut:
#
#   + <seq> <qos> <keep> <topic bytes> <payload bytes> <check>\n<topic><payload>\n
#   - <seq>\n                      (seq was published: it no longer counts)
#
# <check> is the first 16 hex digits of sha256(topic + payload). Records are only ever
# appended, so after a crash only the last one can be torn; loading stops at the first record
# that does not check out, logs what it skipped, and rewrites the file from the good records.
#
# Size policy: `keep` records (results) are never dropped, even past max_bytes: a node holds
# at most a few (it takes no new work while it cannot hear the hub), and each is paid work.
# Other records (events) are dropped oldest first when the file would outgrow max_bytes, and a
# new one is dropped if only results are left to make room: the hub copes with a lost event
# (the result settles the job anyway), never with a lost result.

import os

from edge.core import compat

MAX_BYTES = 8 * 1024 * 1024  # a board passes what its flash can spare
COMPACT_MIN = 64 * 1024  # acknowledged bytes worth rewriting the file for
MAX_TOPIC = 1024
MAX_PAYLOAD = 16 * 1024 * 1024
CHUNK = 4096


def _sync(f):
    f.flush()
    # CPython needs fsync for the data to reach the disk; MicroPython's flush() already syncs
    # (and its unix port has no os.fsync).
    if hasattr(os, "fsync") and hasattr(f, "fileno"):
        os.fsync(f.fileno())


def _replace(src, dst):
    try:
        os.rename(src, dst)  # atomic over an existing file on POSIX
    except OSError:  # FAT: rename does not overwrite. _recover() finishes this after a crash.
        os.remove(dst)
        os.rename(src, dst)


def _check(topic, payload):
    h = compat.sha256(topic)
    h.update(payload)
    return compat.hexlify(h.digest())[:16]


def _header(seq, qos, keep, tlen, plen, check):
    parts = ["+", str(seq), str(qos), "1" if keep else "0", str(tlen), str(plen), check]
    return (" ".join(parts) + "\n").encode()


def _to_bytes(x):
    return x.encode() if isinstance(x, str) else bytes(x)


def _scan(f, on_record, on_ack):
    """Read records from f; returns (good bytes, problem or None). on_record(seq, qos, keep,
    topic, payload_offset, payload_len, check) is called only for records that check out."""
    pos = 0
    while True:
        line = f.readline()
        if not line:
            return pos, None
        if not line.endswith(b"\n"):
            return pos, "an incomplete header"
        try:
            fields = line.decode().split()
        except Exception:
            return pos, "a header that is not text"
        if fields and fields[0] == "-":
            try:
                if len(fields) != 2:
                    raise ValueError
                on_ack(int(fields[1]))
            except ValueError:
                return pos, "a malformed acknowledgement"
            pos += len(line)
            continue
        if len(fields) != 7 or fields[0] != "+":
            return pos, "an unknown header"
        try:
            seq, qos, keep, tlen, plen = [int(x) for x in fields[1:6]]
        except ValueError:
            return pos, "a header with a bad number"
        if seq < 0 or qos not in (1, 2) or keep not in (0, 1):
            return pos, "a header out of range"
        if not 0 < tlen <= MAX_TOPIC or not 0 <= plen <= MAX_PAYLOAD:
            return pos, "a header with an impossible length"
        topic = f.read(tlen)
        if topic is None or len(topic) != tlen:
            return pos, "a torn topic"
        h = compat.sha256(topic)
        left = plen
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                return pos, "a torn payload (" + str(plen - left) + " of " + str(plen) + " bytes)"
            h.update(chunk)
            left -= len(chunk)
        if f.read(1) != b"\n":
            return pos, "a record without its end"
        if compat.hexlify(h.digest())[:16] != fields[6]:
            return pos, "a record whose checksum does not match"
        try:
            topic = topic.decode()
        except Exception:
            return pos, "a topic that is not UTF-8"
        on_record(seq, qos, keep == 1, topic, pos + len(line) + tlen, plen, fields[6])
        pos += len(line) + tlen + plen + 1


def peek(path):
    """The records still queued in the outbox file at path, oldest first, as
    (seq, topic, payload, qos) - read only, for tools and tests; the node's own Outbox may
    have it open."""
    found = {}

    def record(seq, qos, keep, topic, off, plen, check):
        found[seq] = (topic, off, plen, qos)

    if not compat.path_exists(path):
        return []
    out = []
    with open(path, "rb") as f:
        _scan(f, record, lambda seq: found.pop(seq, None))
        for seq in sorted(found):
            topic, off, plen, qos = found[seq]
            f.seek(off)
            out.append((seq, topic, f.read(plen), qos))
    return out


class Outbox:
    """A durable FIFO of (topic, payload, qos). path None: kept in memory only (tests, or a
    board without a filesystem; nothing survives a restart then)."""

    def __init__(self, path=None, max_bytes=MAX_BYTES, log=None):
        self.path = path
        self.max_bytes = max_bytes
        self.log = log or (lambda *a: None)
        # seq -> [topic, qos, keep, payload offset in the file (or the payload itself), length,
        #         check]
        self.entries = {}
        self.size = 0  # bytes in the file
        self.live = 0  # bytes of records not yet acknowledged
        self.next_seq = 1
        self.dropped = 0
        self._f = None  # the append handle, opened on first use
        if path is not None:
            self._recover()
            self._load()

    def __len__(self):
        return len(self.entries)

    # -- the interface ---------------------------------------------------------------------
    def append(self, topic, payload, qos=1, keep=True):
        """Queue a message durably; returns its seq, or None when an event had to be dropped
        for lack of room. Raises OSError when the storage fails (the caller still holds it)."""
        if qos not in (1, 2):
            raise ValueError("only QoS 1 and 2 messages are queued, not QoS " + str(qos))
        topic_b = _to_bytes(topic)
        payload = _to_bytes(payload)
        if not 0 < len(topic_b) <= MAX_TOPIC or len(payload) > MAX_PAYLOAD:
            raise ValueError("message too large for the outbox")
        header = _header(0, qos, keep, len(topic_b), len(payload), "0" * 16)
        need = len(header) + len(topic_b) + len(payload) + 12  # + the seq digits
        if not self._make_room(need, keep, topic):
            return None
        seq = self.next_seq
        self.next_seq += 1
        if self.path is None:
            self.entries[seq] = [topic, qos, keep, payload, len(payload), None]
            self.size += need
            self.live += need
            return seq
        check = _check(topic_b, payload)
        header = _header(seq, qos, keep, len(topic_b), len(payload), check)
        f = self._append_handle()
        f.write(header + topic_b + payload + b"\n")
        _sync(f)
        rec = len(header) + len(topic_b) + len(payload) + 1
        off = self.size + len(header) + len(topic_b)
        self.entries[seq] = [topic, qos, keep, off, len(payload), check]
        self.size += rec
        self.live += rec
        return seq

    def pending(self):
        """Seqs of the queued messages, oldest first."""
        return sorted(self.entries)

    def get(self, seq):
        """(topic, payload bytes, qos) of a queued message."""
        topic, qos, _keep, off, plen, _sum = self.entries[seq]
        if self.path is None:
            return topic, off, qos
        if self._f is not None:
            self._f.flush()
        with open(self.path, "rb") as f:
            f.seek(off)
            payload = f.read(plen)
        if len(payload) != plen:
            raise OSError("outbox " + self.path + " is shorter than its index")
        return topic, payload, qos

    def done(self, seq):
        """The broker has seq: forget it. Not fsynced: after a crash it is only sent again, and
        the hub drops duplicates."""
        entry = self.entries.pop(seq, None)
        if entry is None:
            return
        self.live -= self._record_size(seq, entry)
        if not self.entries:
            self._reset()
            return
        if self.path is not None:
            line = ("- " + str(seq) + "\n").encode()
            f = self._append_handle()
            f.write(line)
            f.flush()
            self.size += len(line)
            dead = self.size - self.live
            if dead > COMPACT_MIN and dead > self.live:
                self._rewrite()
        else:
            self.size = self.live

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    # -- the machinery ---------------------------------------------------------------------
    def _record_size(self, seq, entry):
        topic, qos, keep, _off, plen, _sum = entry
        tlen = len(_to_bytes(topic))
        if self.path is None:
            return len(_header(0, qos, keep, tlen, plen, "0" * 16)) + tlen + plen + 12
        return len(_header(seq, qos, keep, tlen, plen, "0" * 16)) + tlen + plen + 1

    def _make_room(self, need, keep, topic):
        if self.size + need <= self.max_bytes:
            return True
        if self.path is not None and self.size > self.live:
            self._rewrite()
        while self.live + need > self.max_bytes:
            victim = None
            for seq in self.pending():
                if not self.entries[seq][2]:
                    victim = seq
                    break
            if victim is None:
                break
            self.log("outbox full: dropped the queued event " + str(victim) + " on " +
                     self.entries[victim][0])  # fmt: skip
            self.dropped += 1
            self.done(victim)
        if self.path is not None and self.size > self.live:
            self._rewrite()
        if self.live + need <= self.max_bytes:
            return True
        if not keep:
            self.dropped += 1
            self.log("outbox full of results: dropped a new event on " + topic)
            return False
        self.log("outbox over " + str(self.max_bytes) + " bytes: a result is never dropped")
        return True

    def _append_handle(self):
        if self._f is None:
            self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for appends
        return self._f

    def _recover(self):
        """Finish or undo a rewrite a crash interrupted."""
        tmp = self.path + ".tmp"
        if compat.path_exists(tmp):
            if compat.path_exists(self.path):
                os.remove(tmp)  # the rewrite never got to replace the file: it is partial
            else:
                os.rename(tmp, self.path)  # the old file was removed: tmp is complete

    def _load(self):
        def record(seq, qos, keep, topic, off, plen, check):
            self.entries[seq] = [topic, qos, keep, off, plen, check]
            if seq >= self.next_seq:
                self.next_seq = seq + 1

        def ack(seq):
            self.entries.pop(seq, None)
            if seq >= self.next_seq:
                self.next_seq = seq + 1

        if not compat.path_exists(self.path):
            return  # a fresh outbox
        with open(self.path, "rb") as f:
            good, problem = _scan(f, record, ack)
        self.size = os.stat(self.path)[6]
        self.live = 0
        for seq in self.entries:
            self.live += self._record_size(seq, self.entries[seq])
        if problem is not None:
            self.log("outbox " + self.path + ": skipped " + problem + " at byte " + str(good) +
                     " (" + str(self.size - good) + " bytes discarded; a crash mid-write " +
                     "leaves that only at the end)")  # fmt: skip
            self._rewrite()
        elif not self.entries and self.size:
            self._reset()
        if self.entries:
            self.log("outbox " + self.path + ": queued messages to send: " + str(len(self.entries)))

    def _reset(self):
        """Nothing queued: start an empty file (or memory)."""
        self.size = 0
        self.live = 0
        if self.path is None:
            return
        self.close()
        with open(self.path, "wb") as f:
            _sync(f)

    def _rewrite(self):
        """Copy the queued records into a new file and swap it in (compaction)."""
        self.close()
        tmp = self.path + ".tmp"
        moved = []
        pos = 0
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for seq in self.pending():
                topic, qos, keep, off, plen, check = self.entries[seq]
                topic_b = _to_bytes(topic)
                header = _header(seq, qos, keep, len(topic_b), plen, check)
                dst.write(header)
                dst.write(topic_b)
                src.seek(off)
                left = plen
                while left:  # a chunk at a time: a board cannot hold a big result twice
                    chunk = src.read(min(CHUNK, left))
                    if not chunk:
                        raise OSError("outbox " + self.path + " is shorter than its index")
                    dst.write(chunk)
                    left -= len(chunk)
                dst.write(b"\n")
                moved.append((seq, pos + len(header) + len(topic_b)))
                pos += len(header) + len(topic_b) + plen + 1
            _sync(dst)
        _replace(tmp, self.path)
        for seq, off in moved:  # only now: a failed rewrite leaves the old file and index
            self.entries[seq][3] = off
        self.size = pos
        self.live = pos
