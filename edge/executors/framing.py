"""The pipe protocol between the node (`wasm3.py`) and a worker process (`worker.py`): one
frame per message, a 4-byte big-endian length, then a 4-byte header length, a JSON header
and the raw blobs the header lists by name and size. Plain JSON and bytes rather than pickle
because the worker runs untrusted code and nothing it sends may be loaded as objects; a
length prefix so the node can read a worker's answers non-blocking and notice a worker that
stops or babbles mid-frame instead of blocking on it. Both ends share this one module so the
format is written down once.
"""

import json
import os
import struct


def encode(header, blobs=None):
    blobs = blobs or {}
    header = dict(header, blobs=[[k, len(v)] for k, v in blobs.items()])
    head = json.dumps(header).encode()
    body = [struct.pack(">I", len(head)), head, *[bytes(v) for v in blobs.values()]]
    size = sum(len(b) for b in body)
    return struct.pack(">I", size) + b"".join(body)


def decode(payload):
    (hlen,) = struct.unpack_from(">I", payload, 0)
    header = json.loads(bytes(payload[4 : 4 + hlen]))
    pos = 4 + hlen
    blobs = {}
    for name, n in header.pop("blobs", []):
        blobs[name] = bytes(payload[pos : pos + n])
        pos += n
    return header, blobs


def take_headers(buf, max_size):
    """Removes the complete frames at the front of the bytearray `buf` and returns their
    headers; a frame over `max_size` bytes or a header that is not an object is a ValueError."""
    headers = []
    while len(buf) >= 4:
        size = int.from_bytes(buf[:4], "big")
        if size > max_size:
            raise ValueError(f"worker sent a {size}-byte frame")
        if len(buf) < 4 + size:
            break
        header = decode(bytes(buf[4 : 4 + size]))[0]
        if not isinstance(header, dict):
            raise ValueError("frame is not an object")
        headers.append(header)
        del buf[: 4 + size]
    return headers


def read_frame(reader):
    """The next (header, blobs) from a blocking binary reader, or None at end of input."""
    head = reader.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    payload = reader.read(size)
    if len(payload) < size:
        return None
    return decode(payload)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
