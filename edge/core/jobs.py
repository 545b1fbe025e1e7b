# The node's job state machine: assignment -> accepted -> running -> completed | failed.
#
# Duplicates are harmless: an assignment seen before is ignored, or its cached result is sent
# again if the hub missed it. The executor is passed in (submit/poll/cancel, and suspend/resume
# where it can stop a job), so this module runs on MicroPython with whatever executor the board
# has. publish(kind, msg) belongs to the session, which queues what the broker cannot take yet.

from edge.core import compat, jobfiles, protocol

RESULT_CACHE = 16  # finished results kept to answer a re-sent assignment
OWNER_ACTIVE = "owner is using the machine"  # why assignments are turned down while held
GPU_HELD = "GPUs are offered only while the owner is idle"  # why GPU jobs wait
MAX_GPUS = 64


def _check_assignment(msg, engine):
    """What is wrong with an assignment's shape, or None. A malformed one fails its job
    instead of reaching the executor (or crashing the node)."""
    if not isinstance(engine, dict):
        return "engine must be an object"
    args = engine.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return "engine.args must be a list of strings"
    env = engine.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        return "engine.env must map strings to strings"
    entry = engine.get("entrypoint") or "_start"
    if not isinstance(entry, str):
        return "engine.entrypoint must be a string"
    for key, top in (("timeout_s", 7 * 86400), ("memory_mb", 1024 * 1024), ("cpu", 4096)):
        value = msg.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= top
        ):
            return key + " must be a number between 0 and " + str(top)
    command = engine.get("command") or []
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        return "engine.command must be a list of strings"
    if engine.get("image") is not None and not isinstance(engine.get("image"), str):
        return "engine.image must be a string"
    gpu = msg.get("gpu")
    if gpu is not None and (
        isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu <= MAX_GPUS
    ):
        return "gpu must be a whole number from 0 to " + str(MAX_GPUS)
    gas = msg.get("gas")
    if gas is not None and (isinstance(gas, bool) or not isinstance(gas, int) or gas < 1):
        return "gas must be a positive integer"
    pids = engine.get("pids")
    if pids is not None and (isinstance(pids, bool) or not isinstance(pids, int) or pids < 1):
        return "engine.pids must be a positive integer"
    for key in ("module_b64", "stdin_b64", "module_sha256"):
        if msg.get(key) is not None and not isinstance(msg.get(key), str):
            return key + " must be a string"
    files = msg.get("files")
    if files is not None:
        inputs = files.get("inputs") if isinstance(files, dict) else None
        if not isinstance(inputs, list) or len(inputs) > jobfiles.MAX_INPUTS:
            return "files.inputs must be a list of at most " + str(jobfiles.MAX_INPUTS) + " files"
        for f in inputs:
            if not isinstance(f, dict) or not all(
                isinstance(f.get(k), str) for k in ("path", "sha256", "b64")
            ):
                return 'each of files.inputs must be {"path", "sha256", "b64"}'
    return None


def _inputs(files, cap):
    """The assignment's input files as [(path, bytes)], each checked against its sha256 and
    the whole against cap bytes. Raises ValueError naming the problem."""
    out, total, seen = [], 0, []
    for f in files.get("inputs") or []:
        problem = jobfiles.check_path(f["path"])
        if problem:
            raise ValueError(problem)
        if f["path"] in seen:
            raise ValueError("input " + f["path"] + " is given twice")
        seen.append(f["path"])
        try:
            data = compat.b64decode(f["b64"])
        except Exception:
            raise ValueError("input " + f["path"] + " is not base64")
        if compat.hexlify(compat.sha256(data).digest()) != f["sha256"]:
            raise ValueError("input " + f["path"] + ": sha256 does not match")
        total += len(data)
        if total > cap:
            raise ValueError("inputs are over this node's " + str(cap) + "-byte limit")
        out.append((f["path"], data))
    return out


class JobRunner:
    def __init__(
        self, node_id, secret, executor, publish, slots=1, log=None, files=None, gpus=None
    ):  # fmt: skip
        """slots: how many jobs run at once (each in its own worker, process or container).
        files: where and how large file jobs may be here ({"dir", "engines",
        "max_input_bytes", "max_output_bytes", "max_output_files"}), or None: no file jobs.
        gpus: this machine's GPUs ([{"index", "uuid", ...}]); a GPU job gets as many of the
        free ones as it asked for, each GPU one job's at a time."""
        self.node_id = node_id
        self.secret = secret
        self.executor = executor
        self.publish = publish  # publish(kind, msg): the session sends it on our topics
        self.slots = max(1, int(slots))
        self.gpus = list(gpus or [])
        self.gpu_held = None  # why GPU jobs may not run now (the owner's preference), or None
        self.log = log or (lambda *a: None)
        self.running = {}  # job_id -> {"attempt", "handle"}
        self.done = []  # [(job_id, attempt, result msg)], oldest first
        self.completed = 0
        self.failed = 0
        self.held = None  # why the owner's activity stops our jobs now, or None
        self.files = files
        self.litter = []  # job directories that could not be removed yet: tried each poll
        if files is not None:  # what a crash left behind is no job's any more
            self.litter = jobfiles.clear(files["dir"])

    def busy(self):
        return len(self.running) >= self.slots

    def free(self, offer):
        """What is left of the offer ({"cpu", "memory_mb", "gpu"}) after the running jobs'
        shares, and the free slots: a heartbeat's `free`."""
        cpu, mem, gpu = 0.0, 0, 0
        for r in self.running.values():
            cpu += r["cpu"]
            mem += r["memory_mb"]
            gpu += len(r["gpus"])
        return {
            "cpu": round(max(0, (offer.get("cpu") or 0) - cpu), 3),
            "memory_mb": max(0, (offer.get("memory_mb") or 0) - mem),
            "gpu": max(0, (offer.get("gpu") or 0) - gpu),
            "slots": self.slots - len(self.running),
        }

    def _free_gpus(self):
        taken = []
        for r in self.running.values():
            taken.extend(r["gpus"])
        return [g for g in self.gpus if g.get("index") not in taken]

    def running_ids(self):
        return list(self.running.keys())

    def _cached(self, job_id, attempt):
        for jid, att, msg in self.done:
            if jid == job_id and att == attempt:
                return msg
        return None

    def _event(self, job_id, attempt, state, detail=None):
        self.publish(protocol.EVENT, protocol.event(self.node_id, job_id, attempt, state, detail))

    def on_assign(self, msg):
        job_id = msg.get("job_id")
        attempt = msg.get("attempt")
        if not isinstance(job_id, str) or not isinstance(attempt, int):
            self.log("assignment without job_id/attempt dropped")
            return "dropped"
        cached = self._cached(job_id, attempt)
        if cached is not None:
            self.publish(protocol.RESULT, cached)
            self.log("job " + job_id + " assigned again: result re-sent")
            return "resent"
        current = self.running.get(job_id)
        if current is not None and current["attempt"] == attempt:
            return "duplicate"
        if self.held is not None:
            self._event(job_id, attempt, protocol.REJECTED, OWNER_ACTIVE)
            return "rejected"
        if self.busy():
            self._event(job_id, attempt, protocol.REJECTED, "node busy")
            return "rejected"
        engine = msg.get("engine")
        problem = _check_assignment(msg, engine)
        if problem:
            return self._finish_now(job_id, attempt, "invalid assignment: " + problem)
        if engine.get("type") not in self.executor.engines:
            self._event(job_id, attempt, protocol.REJECTED, "engine not available here")
            return "rejected"
        gpus = []
        want = msg.get("gpu") or 0
        if want:
            if self.gpu_held is not None:
                self._event(job_id, attempt, protocol.REJECTED, self.gpu_held)
                return "rejected"
            free = self._free_gpus()
            if len(free) < want:
                why = "not enough free GPUs (" + str(len(free)) + " of " + str(want) + ")"
                self._event(job_id, attempt, protocol.REJECTED, why)
                return "rejected"
            gpus = free[:want]
        try:
            stdin = compat.b64decode(msg.get("stdin_b64") or "")
        except Exception:
            return self._finish_now(job_id, attempt, "invalid assignment: stdin is not base64")
        files = msg.get("files")
        if files is not None and (
            self.files is None or engine.get("type") not in self.files["engines"]
        ):
            self._event(job_id, attempt, protocol.REJECTED, "no file jobs on this node's engine")
            return "rejected"
        job = {
            "job_id": job_id,
            "engine": engine.get("type"),
            "env": engine.get("env") or {},
            "stdin": stdin,
            "timeout_s": msg.get("timeout_s") or 60,
            "memory_mb": msg.get("memory_mb") or 64,
            "cpu": msg.get("cpu") or 1,  # a container's CPU quota; wasm runs one thread anyway
        }
        if gpus:
            job["gpus"] = [{"index": g.get("index"), "uuid": g.get("uuid")} for g in gpus]
        if engine.get("type") == "wasm":
            try:
                module = compat.b64decode(msg.get("module_b64") or "")
            except Exception:
                return self._finish_now(job_id, attempt, "invalid module: not base64")
            if compat.hexlify(compat.sha256(module).digest()) != msg.get("module_sha256"):
                return self._finish_now(job_id, attempt, "invalid module: sha256 does not match")
            job["module"] = module
            job["entrypoint"] = engine.get("entrypoint") or "_start"
            job["args"] = engine.get("args") or []
            if msg.get("gas") is not None:
                job["gas"] = msg.get("gas")
        else:  # docker and native: a command (and an image), no module
            job["command"] = engine.get("command") or []
            job["network"] = engine.get("network") is True
            if engine.get("image") is not None:
                job["image"] = engine.get("image")
            if engine.get("pids") is not None:
                job["pids"] = engine.get("pids")
        root = None
        if files is not None:
            try:
                inputs = _inputs(files, self.files["max_input_bytes"])
            except ValueError as e:
                return self._finish_now(job_id, attempt, "invalid assignment: " + str(e))
            try:
                root, job["dirs"] = jobfiles.prepare(
                    self.files["dir"], job_id + "." + str(attempt), inputs
                )
            except (OSError, ValueError) as e:  # the node's disk: another node may do better
                return self._finish_now(
                    job_id, attempt, "executor error: cannot lay out the job's files: " + repr(e)
                )
        self._event(job_id, attempt, protocol.ACCEPTED)
        try:
            handle = self.executor.submit(job)
        except Exception:
            self._tidy(root)
            raise
        now = compat.ticks_ms()
        self.running[job_id] = {
            "attempt": attempt, "handle": handle, "root": root, "checked": now, "started": now,
            "cpu": job["cpu"], "memory_mb": job["memory_mb"], "paused": False,
            "gpus": [g.get("index") for g in gpus],
        }  # fmt: skip
        self._event(job_id, attempt, protocol.RUNNING)
        self.log("job " + job_id + " running")
        return "accepted"

    def _finish_now(self, job_id, attempt, error):
        outcome = {"status": "failed", "exit_code": None, "error": error, "wall_ms": 0, "cpu_ms": 0}
        self._finish(job_id, attempt, outcome)
        return "failed"

    def _finish(self, job_id, attempt, outcome):
        msg = protocol.result(self.node_id, self.secret, job_id, attempt, outcome)
        self.done.append((job_id, attempt, msg))
        if len(self.done) > RESULT_CACHE:
            self.done.pop(0)
        if msg["state"] == protocol.COMPLETED:
            self.completed += 1
        else:
            self.failed += 1
        self.publish(protocol.RESULT, msg)
        detail = (": " + msg["error"]) if msg["error"] else ""
        self.log("job " + job_id + " " + msg["state"] + detail)

    def hold(self, why):
        """The owner needs the machine: stop running jobs (where the executor can) and turn
        new assignments down until release()."""
        self.held = why or OWNER_ACTIVE
        self._apply()

    def release(self):
        self.held = None
        self._apply()

    def hold_gpus(self, why):
        """The owner's preference keeps the GPUs to them now (gpu_only_when_idle): stop the
        GPU jobs and turn new ones down until release_gpus(); the others run on."""
        self.gpu_held = why or GPU_HELD
        self._apply()

    def release_gpus(self):
        self.gpu_held = None
        self._apply()

    def _apply(self):
        """Stop or continue each running job as the holds now say: every job while the owner
        holds the machine, GPU jobs while the GPUs are held too."""
        for job_id in list(self.running.keys()):
            current = self.running[job_id]
            pause = self.held is not None or (bool(current["gpus"]) and self.gpu_held is not None)
            if pause != current["paused"] and self._act(
                "suspend" if pause else "resume", job_id, current
            ):
                current["paused"] = pause

    def _act(self, verb, job_id, current):
        act = getattr(self.executor, verb, None)
        if act is None:
            if verb == "suspend":
                self.log("this executor cannot suspend jobs: job " + job_id + " runs on")
            return False
        try:
            act(current["handle"])
        except Exception as e:  # a job that ended meanwhile; the next poll collects it
            self.log("could not " + verb + " job " + job_id + ": " + repr(e))
            return False
        return True

    def on_cancel(self, msg):
        """Stop the job the hub cancelled, if this node runs that attempt (or an older one).
        A late cancel for an earlier attempt must not kill the attempt that replaced it here:
        the hub gives a job lost to this node (missed heartbeats, a restart) to it again."""
        job_id = msg.get("job_id")
        attempt = msg.get("attempt")
        if not isinstance(job_id, str) or not isinstance(attempt, int):
            self.log("cancel without job_id/attempt dropped")
            return "dropped"
        current = self.running.get(job_id)
        if current is None:
            return "unknown"
        if attempt < current["attempt"]:
            self.log(
                "cancel for attempt " + str(attempt) + " of job " + job_id + " ignored: attempt "
                + str(current["attempt"]) + " runs here"
            )  # fmt: skip
            return "stale"
        del self.running[job_id]
        self.executor.cancel(current["handle"])
        self._tidy(current.get("root"))
        self._event(job_id, current["attempt"], protocol.CANCELLED)
        return "cancelled"

    def _tidy(self, root):
        """Remove a job's directory; one still held (a process not reaped yet) is tried again
        at each poll until it is gone."""
        if root is not None and not jobfiles.remove_tree(root):
            self.litter.append(root)

    def _outputs(self, current, outcome):
        """Read a finished file job's /outputs into its outcome (or end it with "output
        limit"), then remove its directory whatever happened."""
        root = current.get("root")
        if root is None:
            return outcome
        try:
            error = outcome.get("error") or ""
            if outcome.get("status") != "cancelled" and not error.startswith(jobfiles.OUTPUT_LIMIT):
                outcome["outputs"] = jobfiles.collect(root + "/out", self.files)
        except jobfiles.OutputLimit as e:
            outcome = _limit_outcome(outcome, str(e))
        except OSError as e:
            outcome = _limit_outcome(outcome, "executor error: cannot read the job's outputs: "
                                     + repr(e))  # fmt: skip
        finally:
            self._tidy(root)
        return outcome

    def _watch(self, job_id, current):
        """A running file job past the output caps is stopped: its outcome, or None."""
        now = compat.ticks_ms()
        if current.get("root") is None or compat.ticks_diff(now, current["checked"]) < 0:
            return None
        current["checked"] = now + jobfiles.CHECK_MS
        try:
            jobfiles.measure(current["root"] + "/out", self.files)
        except jobfiles.OutputLimit as e:
            self.executor.cancel(current["handle"])
            ran = {"wall_ms": compat.ticks_diff(now, current["started"]), "cpu_ms": 0}
            return _limit_outcome(ran, str(e))
        except OSError:
            pass  # the job is changing it under us: measured again next time
        return None

    def poll(self):
        """Collect finished jobs; returns how many finished."""
        finished = 0
        if self.litter:
            self.litter = [p for p in self.litter if not jobfiles.remove_tree(p)]
        for job_id in list(self.running.keys()):
            current = self.running[job_id]
            outcome = self.executor.poll(current["handle"])
            if outcome is None:
                outcome = self._watch(job_id, current)
                if outcome is None:
                    continue
            del self.running[job_id]
            finished += 1
            outcome = self._outputs(current, outcome)
            if outcome.get("status") == "cancelled":
                continue
            self._finish(job_id, current["attempt"], outcome)
        return finished


def _limit_outcome(outcome, error):
    """The outcome of a job ended by a limit: failed, no exit code, no outputs."""
    out = dict(outcome)
    out["status"] = "failed"
    out["exit_code"] = None
    out["error"] = error
    out.pop("outputs", None)
    return out
