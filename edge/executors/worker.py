"""The worker process of the wasm3 executor, `python -S -m edge.executors.worker`: it reads
jobs from stdin and answers on the original stdout, one frame each (`framing.py`), and runs
each job in a fresh wasm3 runtime (`runner.py`). The job's own stdout and stderr go to two
files the node opened and handed over (`--stdout-fd`, `--stderr-fd`), so whatever a job wrote
is still there when the node has to SIGKILL this process at a timeout; the process's own fd 2
(wasm3 prints backtraces there, Python its fatal errors) is a third file the node reads only
to explain a crash. Jobs run on a thread with a 64 MiB stack because wasm3 recurses on the C
stack for wasm calls.
"""

import os
import sys
import threading
import time

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

from edge.executors.framing import encode, read_frame, write_all
from edge.executors.runner import run_job

NATIVE_STACK_BYTES = 64 << 20


def serve(reader, out, out_fd, err_fd):
    write_all(out, encode({"type": "ready", "pid": os.getpid(), "cpu_ms": _cpu_ms()}))
    while True:
        frame = read_frame(reader)
        if frame is None:
            return  # the node closed our stdin: retire
        job, blobs = frame
        try:
            result = run_job(job, blobs, out_fd, err_fd)
        except Exception as e:  # a bug here must still answer the node, not hang it
            result = {
                "status": "failed",
                "exit_code": None,
                "returns": None,
                "error": f"executor error: {type(e).__name__}: {e}",
            }
        result.update(type="result", cpu_total_ms=_cpu_ms())
        del frame, blobs
        write_all(out, encode(result))


def _cpu_ms():
    return int(time.process_time() * 1000)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    out_fd, err_fd = int(opts["--stdout-fd"]), int(opts["--stderr-fd"])
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    # Our stdout carries frames; move it aside so nothing else can write into it.
    proto = os.dup(1)
    os.dup2(2, 1)
    reader = os.fdopen(0, "rb")
    import wasm3  # noqa: F401 - loaded once here, so the first job does not pay for it

    threading.stack_size(NATIVE_STACK_BYTES)
    t = threading.Thread(target=serve, args=(reader, proto, out_fd, err_fd), daemon=True)
    t.start()
    t.join()


if __name__ == "__main__":
    main()
