"""An executor made at its first job. The node announces its engines in its hello at once;
the executor itself (its module, its worker machinery; the wasm engine loads in the workers
it starts) is imported and built only when a job comes, so a node goes online without it.

`Deferred(make, engines)` stands in for `make()`: it says what the executor will offer
(engines, takes_files, allow_network: the session tells the hub these before any job) and
passes the runner's calls on to the executor once made.
"""


class Deferred:
    def __init__(self, make, engines, takes_files=False, allow_network=False):
        self.make = make
        self.engines = tuple(engines)
        self.takes_files = takes_files
        self.allow_network = allow_network
        self.executor = None  # made at the first submit
        self.closed = False

    def submit(self, job):
        if self.executor is None:
            if self.closed:
                raise RuntimeError("the executor is closed")
            self.executor = self.make()
        return self.executor.submit(job)

    # A handle comes from submit: the executor exists for every call below that takes one.
    def poll(self, handle):
        return self.executor.poll(handle)

    def cancel(self, handle):
        self.executor.cancel(handle)

    def suspend(self, handle, *why):
        if hasattr(self.executor, "suspend"):
            self.executor.suspend(handle, *why)

    def resume(self, handle, *why):
        if hasattr(self.executor, "resume"):
            self.executor.resume(handle, *why)

    def job_pids(self):
        if self.executor is None or not hasattr(self.executor, "job_pids"):
            return []
        return self.executor.job_pids()

    def close(self):
        self.closed = True
        if self.executor is not None:
            self.executor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
