"""Several executors behind the one interface the job runner knows.

A full machine can run wasm (wasm3 or wasmtime), docker and native jobs; the runner holds one
executor. The router offers the union of the engines and sends each job to the executor of
its `engine` field; a handle remembers which executor owns it. Optional methods (suspend,
resume, job_pids) are passed on to the executors that have them.
"""


class ExecutorRouter:
    def __init__(self, executors, for_files=None):
        """executors: {engine name: executor}; one executor may serve several names.
        for_files: {engine name: executor} for the jobs of that engine that have files (a
        job with "dirs"), where its own executor has none: the pywasm3 worker runs wasm jobs
        without files, wasm3-run (whose WASI has the filesystem) those with."""
        if not executors:
            raise ValueError("the router needs at least one executor")
        self.by_engine = dict(executors)
        self.for_files = dict(for_files or {})
        self.engines = tuple(sorted(self.by_engine))
        self._owner = {}  # id(handle) -> (executor, handle)

    def file_engines(self):
        """The engines whose jobs may have files here."""
        return sorted(
            e for e, ex in self.by_engine.items()
            if e in self.for_files or getattr(ex, "takes_files", False) is True
        )  # fmt: skip

    def _unique(self):
        seen, out = set(), []
        for ex in list(self.by_engine.values()) + list(self.for_files.values()):
            if id(ex) not in seen:
                seen.add(id(ex))
                out.append(ex)
        return out

    def submit(self, job):
        engine = job.get("engine") or "wasm"
        ex = self.for_files.get(engine) if job.get("dirs") else None
        ex = ex or self.by_engine.get(engine)
        if ex is None:
            raise ValueError("no executor for engine " + repr(engine))
        handle = ex.submit(job)
        self._owner[id(handle)] = (ex, handle)
        return handle

    def _of(self, handle):
        return self._owner[id(handle)][0]

    def poll(self, handle):
        outcome = self._of(handle).poll(handle)
        if outcome is not None:
            self._owner.pop(id(handle), None)
        return outcome

    def cancel(self, handle):
        entry = self._owner.pop(id(handle), None)
        if entry is not None:
            entry[0].cancel(handle)

    def suspend(self, handle):
        ex = self._of(handle)
        if hasattr(ex, "suspend"):
            ex.suspend(handle)

    def resume(self, handle):
        ex = self._of(handle)
        if hasattr(ex, "resume"):
            ex.resume(handle)

    def job_pids(self):
        pids = []
        for ex in self._unique():
            if hasattr(ex, "job_pids"):
                pids.extend(ex.job_pids())
        return pids

    def close(self):
        for ex in self._unique():
            ex.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
