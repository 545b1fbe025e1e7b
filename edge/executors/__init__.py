"""Job executors: each backend its own module, imported only on machines that have it. The
wasm3 backend is split so each piece can be read (or left out of a build) alone: `wasm3.py`
is the node's executor, `workerproc.py` its handle on a worker process, `framing.py` the pipe
protocol between them, and `worker.py`, `runner.py`, `wasi.py`, `wasmbin.py`, `wasmcode.py` and
`memcap.py` run in the worker process only.
"""
