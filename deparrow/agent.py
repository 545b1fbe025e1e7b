"""The Python SDK for DEparrow agents: a wallet, jobs, and services bought and sold.

An `Agent` speaks for one identity of a hub, given the hub's URL and the identity's API token
(`dpt_...`). It reads its wallet, submits WebAssembly jobs and waits for their results (over
REST, or submitting over MQTT), finds other agents' services and calls them, and registers
services of its own that it answers while `serve()` runs::

    from deparrow import Agent

    seller = Agent("http://127.0.0.1:8765", "dpt_...")
    seller.register_service(
        "fib", lambda inp: {"fib": fib(inp["n"])}, price="0.01",
        input_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
    )
    seller.serve()  # answers calls until stop() or Ctrl-C

    buyer = Agent("http://127.0.0.1:8765", "dpt_...")
    result = buyer.call("fib", {"n": 30})
    print(result.output, result.price)

Calls go through the hub, which holds the price from the caller's wallet, hands the call to
the serving agent over MQTT, and pays the agent exactly once when its answer matches the
service's output schema, refunding the caller on an error or a timeout (docs/agents.md).

A job submitted over MQTT is told back over MQTT: the hub publishes the finished job on the
agent's reply topic (its "final reply", docs/protocol.md), so `run_job(spec, via="mqtt")` and
`wait_job` wait for that message instead of polling REST, and `submit_job(spec, via="mqtt",
on_done=fn)` calls fn(job) once when it arrives::

    job = buyer.run_job({"engine": {...}, "timeout": 10}, via="mqtt")
    print(job["result"], job["cost"])

A hub that serves TLS (`deparrow hub --tls`, docs/tls.md) is reached at its https:// URL, and
its broker at the mqtts:// URL it gives out, both verified with `ca`: the hub's CA file or the
sha256: fingerprint `deparrow node token` prints, as the CLI's --ca takes it (default: the
environment's DEPARROW_CA, else the system's CAs)::

    buyer = Agent("https://hub.example.org:8765", "dpt_...", ca="sha256:5f1c...")

Errors are exceptions that say what went wrong: `AuthError` (401/403), `InsufficientCredits`
(402, with the shortfall), `NotFound` (404), `CallFailed` and `JobFailed` (the work ended
without a result), `DeparrowError` for the rest.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from deparrow.bootstrap import NOT_SENT, failure, resendable
from deparrow.client import TERMINAL_STATES, Client, HubError
from edge.core import protocol
from edge.enroll import is_pin, tls_context, untrusted

log = logging.getLogger(__name__)

Handler = Callable[[Any], Any]
JobCallback = Callable[[dict[str, Any]], None]
FINAL = "final"  # the field of a job's final reply (docs/protocol.md, "The final reply")
BROKER_WINDOW_S = 10.0  # with a bootstrap URL, a broker lost this long is left for another
KEEP_FINALS = 1000  # finished jobs remembered, to drop a duplicate final and serve wait_job


# --- errors -----------------------------------------------------------------------------------
class DeparrowError(Exception):
    """The hub refused a request or could not be reached; `status` is the HTTP status (0 when
    there was no answer) and `body` the hub's JSON error."""

    def __init__(self, message: str, status: int = 0, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}
        # How the request failed, when another replica might do better (deparrow/bootstrap.py)
        self.failover: str | None = None


class AuthError(DeparrowError):
    """401 or 403: an unknown token, or something this identity may not do."""


class NotFound(DeparrowError):
    """404: no such service, job, call or agent (or not one this identity may see)."""


class InsufficientCredits(DeparrowError):
    """402: the wallet cannot pay; nothing was held or charged."""

    @property
    def shortfall(self) -> Decimal:
        return Decimal(str(self.body.get("shortfall") or 0))


class CallFailed(DeparrowError):
    """A service call ended without a result (the agent failed, or did not answer in time);
    the caller was refunded. `call` is the hub's record of it."""

    def __init__(self, call: dict[str, Any]) -> None:
        super().__init__(
            f"call {call.get('id')} to {call.get('service_name')} {call.get('state')}: "
            f"{call.get('error')} (refunded)",
            body=call,
        )
        self.call = call


class JobFailed(DeparrowError):
    """A job ended failed or cancelled; `job` is the hub's view of it (its `reason` says why)."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(f"job {job.get('id')} {job.get('state')}: {job.get('reason')}", body=job)
        self.job = job


_BY_STATUS: dict[int, type[DeparrowError]] = {
    401: AuthError,
    403: AuthError,
    402: InsufficientCredits,
    404: NotFound,
}


def _error(status: int, body: dict[str, Any]) -> DeparrowError:
    cls = _BY_STATUS.get(status, DeparrowError)
    message = str(body.get("error") or f"HTTP {status}")
    if body.get("field") and str(body["field"]) not in message:
        message += f" (field: {body['field']})"
    return cls(message, status, body)


# --- values -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Wallet:
    owner: str
    balance: Decimal  # credits free to spend
    held: Decimal  # credits held for running jobs and pending calls


@dataclass(frozen=True)
class Service:
    id: str
    agent: str
    agent_name: str
    name: str
    description: str
    tags: tuple[str, ...]
    price: Decimal  # credits per call
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    timeout_s: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Service:
        return cls(d["id"], d["agent"], d.get("agent_name", ""), d["name"], d["description"],
                   tuple(d["tags"]), Decimal(d["price"]), d["input_schema"], d["output_schema"],
                   float(d["timeout_s"]))  # fmt: skip


@dataclass(frozen=True)
class CallResult:
    id: str
    service: str
    agent: str
    output: Any
    price: Decimal  # what the call cost the caller
    raw: dict[str, Any] = field(repr=False)


@dataclass
class _Served:
    service: Service
    handler: Handler


# --- the agent --------------------------------------------------------------------------------
class Agent:
    """One identity on a hub: an agent (or any user) with its API token."""

    def __init__(
        self,
        hub_url: str | None,
        token: str,
        *,
        timeout_s: float = 30.0,
        ca: str | None = None,
        bootstrap: str | None = None,
        region: str | None = None,
    ) -> None:
        """bootstrap: instead of hub_url (None), the URL(s) of the hub's replicas: the agent
        uses the best one that answers and moves to the next when one fails, sending again
        only what is safe to send twice (deparrow/bootstrap.py); region: prefer its
        replicas."""
        if hub_url is None and not bootstrap:
            raise ValueError("hub_url (or bootstrap, the URL of any of the hub's replicas)")
        if hub_url is not None and not hub_url.startswith(("http://", "https://")):
            raise ValueError(f"hub_url must be an http(s) URL, not {hub_url!r}")
        if not token:
            raise ValueError("an API token (dpt_...) is required")
        self.token = token
        self.timeout_s = timeout_s
        # The CA an https:// hub and an mqtts:// broker are verified with: a PEM file or a
        # sha256: fingerprint (the CLI's --ca); the client makes (and keeps) the context.
        self.ca = ca or os.environ.get("DEPARROW_CA") or None
        # Which replica is in use, and how it is verified: the REST client keeps both.
        try:
            self._tls = Client(hub_url, timeout_s=timeout_s, ca=self.ca, bootstrap=bootstrap,
                               region=region)  # fmt: skip
        except HubError as e:
            raise ValueError(str(e)) from None
        self.bootstrap = bootstrap
        self._jwt: str | None = None
        self._jwt_exp = 0.0
        self._id: str | None = None
        self._lock = threading.Lock()  # the MQTT connection
        self._answer_lock = threading.Lock()  # the calls answered
        self._mqtt: Any = None  # paho client, once connected
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._served: dict[str, _Served] = {}
        self._answered: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self.notices: list[dict[str, Any]] = []  # what the hub told this agent over MQTT
        # Jobs submitted over MQTT: told back by their final reply (one per job; a duplicate,
        # which QoS 1 and a hub restart can bring, is dropped by the job id).
        self._done = threading.Condition()
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._pending_jobs: set[str] = set()  # submitted over MQTT here, final not yet come
        self._on_done: dict[str, JobCallback] = {}
        # With a bootstrap URL: a broker gone this long is left for another (_check_broker).
        self.broker_window_s = BROKER_WINDOW_S
        self._lost_at: float | None = None  # when the broker connection was lost
        self.broker: str | None = None  # the MQTT broker it is connected to (or was last)

    # --- creating agents --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        hub_url: str | None,
        owner_token: str,
        name: str,
        fund: str | int = 0,
        ca: str | None = None,
        bootstrap: str | None = None,
    ) -> Agent:
        """Create a new agent owned by the holder of owner_token, moving `fund` credits from
        the owner's wallet to it, and return it (its token is `agent.token`)."""
        owner = cls(hub_url, owner_token, ca=ca, bootstrap=bootstrap)
        # Not sent again after a failure that may have reached a replica: the hub takes no
        # Idempotency-Key for it, and a second agent would be funded twice.
        body = owner.request("POST", "/api/v1/agents", {"name": name, "fund": str(fund)})
        return cls(hub_url, str(body["token"]), ca=owner.ca, bootstrap=bootstrap)

    @property
    def hub(self) -> str:
        """The hub's URL: the replica in use, with a bootstrap URL."""
        try:
            return self._tls.hub
        except HubError as e:  # no replica answers the bootstrap list
            raise DeparrowError(str(e)) from None

    # --- identity and REST --------------------------------------------------------------------
    @property
    def id(self) -> str:
        """This identity's user id (`u_...`), also its MQTT user name."""
        if self._id is None:
            self._login()
        assert self._id is not None
        return self._id

    def _login(self) -> str:
        body = self.request("POST", "/api/v1/auth/token", {"token": self.token}, auth=False)
        self._jwt, self._jwt_exp, self._id = body["jwt"], float(body["expires_at"]), body["user"]
        return str(self._jwt)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Any REST call of the hub's API (docs: /api/v1/openapi.json) as this identity: the
        decoded JSON answer, or the matching DeparrowError. With a bootstrap URL, a replica
        that fails is left for the next one, and the request sent again there when that is
        safe (deparrow/bootstrap.py)."""
        if self._tls.replicas is None:
            return self._request_once(method, path, body, auth, headers, timeout_s)
        tried: list[str] = []
        while True:
            try:
                return self._request_once(method, path, body, auth, headers, timeout_s)
            except DeparrowError as e:
                kind = getattr(e, "failover", None)
                if kind is None:
                    raise
                if kind != NOT_SENT and not resendable(method, path, headers):
                    unsafe = DeparrowError(
                        f"{e}: {method} {path} may or may not have been done on {self.hub}, "
                        "and sending it again is not safe; look before retrying",
                        e.status, e.body,
                    )  # fmt: skip
                    unsafe.failover = kind
                    raise unsafe from None
                tried.append(self.hub)
                try:
                    self._tls._move_on(tried, HubError(str(e), e.status, e.body))
                except HubError as gone:
                    raise DeparrowError(str(gone), e.status, e.body) from None
                self._jwt = None  # signed in again (replicas of one store share the JWT key)

    def _request_once(
        self,
        method: str,
        path: str,
        body: Any,
        auth: bool,
        headers: dict[str, str] | None,
        timeout_s: float | None,
    ) -> Any:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if auth:
            jwt = self._jwt if self._jwt and time.time() < self._jwt_exp - 30 else self._login()
            hdrs["Authorization"] = "Bearer " + jwt
        req = urllib.request.Request(self.hub + path, data=data, method=method, headers=hdrs)
        context = self._hub_context()
        try:
            with urllib.request.urlopen(
                req, timeout=timeout_s or self.timeout_s, context=context
            ) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())
            except ValueError:
                err = {"error": str(e.reason)}
            refused = _error(e.code, err)
            refused.failover = failure(e)
            raise refused from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLCertVerificationError):
                why = untrusted(reason, self.hub, self.ca is not None)
                raise DeparrowError(f"cannot reach the hub at {self.hub}: {why}") from None
            gone = DeparrowError(f"cannot reach the hub at {self.hub}: {reason}")
            gone.failover = failure(e)
            raise gone from None
        return json.loads(payload) if payload else None

    # --- wallet -----------------------------------------------------------------------------
    def wallet(self) -> Wallet:
        """The balance and the credits held for running jobs and pending calls."""
        w = self.request("GET", "/api/v1/wallet")
        return Wallet(w["owner"], Decimal(w["balance"]), Decimal(w["held"]))

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The wallet's movements, newest first: entry, at, reason, amount, balance_after."""
        return list(self.request("GET", f"/api/v1/wallet/history?limit={int(limit)}")["items"])

    def transfer(
        self, to: str, amount: str | int | Decimal, *, key: str | None = None, memo: str = ""
    ) -> dict[str, Any]:
        """Send credits to a user or agent. Give `key` to make a retry harmless."""
        body = {"to": to, "amount": str(amount), "memo": memo}
        answer: dict[str, Any] = self.request(
            "POST", "/api/v1/wallet/transfer", body,
            headers={"Idempotency-Key": key or uuid.uuid4().hex},
        )  # fmt: skip
        return answer

    # --- jobs -------------------------------------------------------------------------------
    def submit_job(
        self,
        spec: dict[str, Any],
        *,
        via: str = "rest",
        key: str | None = None,
        on_done: JobCallback | None = None,
    ) -> str:
        """Submit a job spec (the body of POST /api/v1/jobs); returns its id. `via="mqtt"`
        publishes it on this agent's `submit` topic instead, and the hub tells the finished
        job back over MQTT: `on_done(job)` (MQTT only) is then called once, in a worker
        thread, with the job as GET /api/v1/jobs/{id} shows it. The same `key` never creates
        a second job."""
        key = key or uuid.uuid4().hex
        if via == "rest":
            if on_done is not None:
                raise ValueError("on_done needs via='mqtt': a job submitted over REST is polled")
            job = self.request("POST", "/api/v1/jobs", spec, headers={"Idempotency-Key": key})
            return str(job["id"])
        if via != "mqtt":
            raise ValueError(f"via must be 'rest' or 'mqtt', not {via!r}")
        reply = self._ask(protocol.SUBMIT, key, protocol.submit(key, self.token, spec), 30.0)
        if not reply["ok"]:
            body = reply["body"]
            raise _error(int(body.get("status") or 400), body)
        job_id = str(reply["body"]["id"])
        # A retried key whose job is over already: its final reply went out long ago.
        over = reply["body"].get("state") in TERMINAL_STATES
        with self._done:
            finished = self._finished.get(job_id)
            if finished is None and not over:
                self._pending_jobs.add(job_id)
                if on_done is not None:
                    self._on_done[job_id] = on_done
        if on_done is not None and (finished is not None or over):
            self._run_callback(on_done, finished if finished is not None else self.job(job_id))
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", f"/api/v1/jobs/{job_id}")
        return answer

    def wait_job(self, job_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """Wait until the job is completed, failed or cancelled; returns the hub's view. A
        job this agent submitted over MQTT is waited for on its final reply; others are
        polled over REST."""
        with self._done:
            mqtt = job_id in self._pending_jobs or job_id in self._finished
            if mqtt:
                self._done.wait_for(lambda: job_id in self._finished, timeout_s)
                finished = self._finished.get(job_id)
        if mqtt:
            if finished is not None:
                return finished
            job = self.job(job_id)  # once, to say where it is (or if the reply was lost)
            if job["state"] in TERMINAL_STATES:
                return job
            raise DeparrowError(
                f"job {job_id} still {job['state']} after {timeout_s:g}s ({job.get('reason')})"
            )
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            job = self.job(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise DeparrowError(
                    f"job {job_id} still {job['state']} after {timeout_s:g}s ({job.get('reason')})"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def run_job(
        self, spec: dict[str, Any], *, via: str = "rest", timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """Submit, wait, and return the completed job (its `result` and `cost`); JobFailed
        when it failed or was cancelled. Over MQTT it waits for the job's final reply."""
        job = self.wait_job(self.submit_job(spec, via=via), timeout_s)
        if job["state"] != "completed":
            raise JobFailed(job)
        return job

    # --- finding and calling services -----------------------------------------------------
    def find_services(self, q: str | None = None, tag: str | None = None) -> list[Service]:
        """Services whose name, description or tags contain every word of q, carrying tag;
        cheapest first."""
        query = {k: v for k, v in (("q", q), ("tag", tag)) if v}
        path = "/api/v1/agents/services" + ("?" + urllib.parse.urlencode(query) if query else "")
        return [Service.from_json(s) for s in self.request("GET", path)["services"]]

    def service(self, service_id: str) -> Service:
        return Service.from_json(self.request("GET", f"/api/v1/agents/services/{service_id}"))

    def _resolve(self, service: str | Service) -> Service:
        if isinstance(service, Service):
            return service
        if service.startswith("s_"):
            return self.service(service)
        named = [s for s in self.find_services(q=service) if s.name == service]
        if not named:
            raise NotFound(f"no service named {service!r}: see find_services()", 404)
        return named[0]  # the cheapest

    def call(
        self,
        service: str | Service,
        input: Any,
        *,
        timeout_s: float | None = None,
        key: str | None = None,
        via: str = "rest",
    ) -> CallResult:
        """Call a service (its id, its name — the cheapest of that name — or a Service) and
        return its output and price. The same `key` is the same call: a retry is never
        charged twice. CallFailed when the agent failed or did not answer (refunded)."""
        svc = self._resolve(service)
        key = key or uuid.uuid4().hex
        wait = (timeout_s or svc.timeout_s) + 15
        if via == "rest":
            body: dict[str, Any] = {"input": input}
            if timeout_s is not None:
                body["timeout_s"] = timeout_s
            call = self.request(
                "POST", f"/api/v1/agents/services/{svc.id}/call", body,
                headers={"Idempotency-Key": key}, timeout_s=wait,
            )  # fmt: skip
        elif via == "mqtt":
            msg = protocol.invoke(key, self.token, svc.id, input, timeout_s)
            reply = self._ask(protocol.INVOKE, key, msg, wait)
            call = reply["body"]
            if not reply["ok"] and "status" in call:
                raise _error(int(call["status"]), call)
        else:
            raise ValueError(f"via must be 'rest' or 'mqtt', not {via!r}")
        if call["state"] != "completed":
            raise CallFailed(call)
        return CallResult(call["id"], svc.id, call["agent"], call["output"],
                          Decimal(call["paid"]), call)  # fmt: skip

    # --- selling services -------------------------------------------------------------------
    def register_service(
        self,
        name: str,
        handler: Handler,
        *,
        price: str | int | Decimal,
        description: str = "",
        tags: Iterable[str] = (),
        input_schema: dict[str, Any] | None = None,
        output_schema: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Service:
        """Register (or update) a service this agent sells at `price` credits per call, and
        the handler that answers it: handler(input) -> output, run in a worker thread while
        serve() runs. The output must match output_schema or the call fails and is refunded;
        an exception in the handler fails the call with its message."""
        body: dict[str, Any] = {
            "name": name,
            "price": str(price),
            "description": description,
            "tags": list(tags),
            "input_schema": input_schema or {},
            "output_schema": output_schema or {},
        }
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        svc = Service.from_json(self.request("POST", "/api/v1/agents/services", body))
        self._served[svc.id] = _Served(svc, handler)
        return svc

    def start(self) -> None:
        """Connect to the hub's broker and answer calls in the background (returns at once)."""
        if not self._served:
            log.warning("agent %s serves nothing yet: register_service() first", self.id)
        self._stop.clear()
        self._connect()

    def serve(self) -> None:
        """Answer calls until stop() is called (from another thread) or Ctrl-C."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                self._check_broker()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Disconnect from the broker and stop the worker threads."""
        self._stop.set()
        client, self._mqtt = self._mqtt, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        """This agent as its owner sees it: balance, state, service jobs, calls, notices."""
        answer: dict[str, Any] = self.request("GET", f"/api/v1/agents/{self.id}")
        return answer

    # --- TLS --------------------------------------------------------------------------------
    def _hub_context(self) -> ssl.SSLContext | None:
        """How an https:// hub is verified (None for http://); made on first use and kept."""
        try:
            return self._tls.ssl_context()
        except HubError as e:  # an unreadable CA file, a fingerprint the hub's CA lacks
            raise DeparrowError(str(e)) from None

    def _broker_context(self) -> ssl.SSLContext:
        """How an mqtts:// broker is verified: as the hub (the hub's own CA signs both), or,
        for an http:// hub behind a proxy, with the CA file given, else the system's CAs."""
        context = self._hub_context()
        if context is not None:
            return context
        if self.ca is not None and is_pin(self.ca):
            raise DeparrowError(
                f"a sha256: fingerprint as ca pins an https:// hub's CA; {self.hub} is not one: "
                "pass the broker's CA file instead"
            )
        return tls_context(ca_file=self.ca)

    # --- MQTT -------------------------------------------------------------------------------
    def _broker_urls(self) -> list[str]:
        """Where to connect: with a bootstrap URL, the brokers its list gives (fetched again),
        best first; else the one the hub gives out (the first, for a broker cluster's list)."""
        replicas = self._tls.replicas
        if replicas is not None:
            with contextlib.suppress(OSError):  # none answers the list: the one known
                replicas.refresh()
            if replicas.brokers:
                return list(replicas.brokers)
        given = self.request("GET", "/api/v1/status", auth=False)["broker"]["public_url"]
        return [str(given).split(",")[0].strip()]

    def _connect(self) -> Any:
        with self._lock:
            if self._mqtt is not None:
                return self._mqtt
            problem: DeparrowError | None = None
            for url in self._broker_urls():
                try:
                    self._mqtt = self._connect_to(urllib.parse.urlsplit(url))
                except DeparrowError as e:  # the next broker, with a bootstrap URL
                    problem = e
                    continue
                self._lost_at, self.broker = None, url
                return self._mqtt
            assert problem is not None
            raise problem

    def _check_broker(self) -> None:
        """With a bootstrap URL: a broker lost for broker_window_s is left for the best one
        the list gives now (and one left with none to take over is tried again here); final
        replies missed meanwhile are read over REST."""
        if self.bootstrap is None:
            return
        if self._mqtt is not None:
            lost = self._lost_at
            if lost is None or time.monotonic() - lost < self.broker_window_s:
                return
            with self._lock:
                old, self._mqtt = self._mqtt, None
            if old is None:
                return
            log.warning("agent %s: the broker at %s was gone for %g s; moving to another",
                        self._id, getattr(old, "host", "?"), self.broker_window_s)  # fmt: skip
            old.disconnect()
            old.loop_stop()
        try:
            self._connect()
        except DeparrowError as e:  # none takes us now: the next check tries again
            log.warning("agent %s: no broker takes it: %s", self._id, e)
            return
        if self._pool is not None:
            self._pool.submit(self._recover_finals)

    def _connect_to(self, url: urllib.parse.SplitResult) -> Any:
        """A connection to one broker, subscribed; DeparrowError (AuthError: refused)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"{self.id}-{uuid.uuid4().hex[:8]}")  # fmt: skip
        client.username_pw_set(self.id, self.token)
        tls = url.scheme in ("mqtts", "ssl")
        if tls:  # a hub with --tls gives out its broker's TLS listener
            client.tls_set_context(self._broker_context())
        subscribed = threading.Event()
        refused: list[str] = []
        connects: list[int] = []

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if rc.is_failure:
                refused.append(str(rc))
                subscribed.set()
                return
            c.subscribe([(protocol.agent_topic(self.id, k), 1) for k in protocol.AGENT_IN])
            self._lost_at = None
            connects.append(1)
            if len(connects) > 1 and self._pool is not None:
                # A clean session: final replies sent while away were lost with it.
                self._pool.submit(self._recover_finals)

        def on_disconnect(*_a: Any) -> None:
            if self._lost_at is None and self._mqtt is client:
                self._lost_at = time.monotonic()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_subscribe = lambda *_a: subscribed.set()
        client.on_message = self._on_message
        port = url.port or (8883 if tls else 1883)
        try:
            client.connect(url.hostname or "127.0.0.1", port, keepalive=30)
        except ssl.SSLCertVerificationError as e:
            why = untrusted(e, url.geturl(), self.ca is not None)
            raise DeparrowError(f"cannot reach the hub's broker at {url.geturl()}: {why}") from None
        except OSError as e:
            raise DeparrowError(f"cannot reach the hub's broker at {url.geturl()}: {e}") from None
        client.loop_start()
        if not subscribed.wait(15) or refused:
            client.loop_stop()
            raise AuthError(
                f"the broker at {url.geturl()} refused agent {self.id}: "
                f"{refused[0] if refused else 'no answer'}"
            )
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="deparrow-call")
        return client

    def _ask(self, kind: str, request_id: str, msg: dict[str, Any], timeout_s: float) -> Any:
        """Publish on this agent's `kind` topic and wait for the reply with request_id."""
        self._check_broker()
        client = self._connect()
        event: threading.Event = threading.Event()
        slot: list[dict[str, Any]] = []
        self._waiting[request_id] = (event, slot)
        try:
            client.publish(protocol.agent_topic(self.id, kind), json.dumps(msg), qos=1)
            if not event.wait(timeout_s):
                raise DeparrowError(
                    f"no reply from the hub to {kind} {request_id} within {timeout_s:g}s; "
                    "send it again with the same key (it cannot be done twice)"
                )
            return slot[0]
        finally:
            self._waiting.pop(request_id, None)

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        try:
            msg = json.loads(m.payload)
        except ValueError:
            log.warning("agent %s: a message on %s is not JSON; ignored", self._id, m.topic)
            return
        kind = m.topic.rsplit("/", 1)[-1]
        if kind == protocol.REPLY and msg.get(FINAL) and isinstance(msg.get("body"), dict):
            self._on_final(msg["body"])
        elif kind == protocol.REPLY:
            waiting = self._waiting.get(str(msg.get("request_id")))
            if waiting is not None:
                waiting[1].append(msg)
                waiting[0].set()
        elif kind == protocol.CALL:
            self._on_call(msg)
        elif kind == protocol.NOTICE:
            log.warning("agent %s: %s", self._id, msg.get("message"))
            self.notices.append(msg)

    def _on_final(self, job: dict[str, Any]) -> None:
        """A job's final reply (or, after a reconnect, its state read once over REST)."""
        job_id = str(job.get("id"))
        with self._done:
            if job_id in self._finished:  # a duplicate: QoS 1, or the hub sent it again
                return
            self._finished[job_id] = job
            while len(self._finished) > KEEP_FINALS:
                self._finished.popitem(last=False)
            self._pending_jobs.discard(job_id)
            callback = self._on_done.pop(job_id, None)
            self._done.notify_all()
        if callback is not None:
            self._run_callback(callback, job)

    def _run_callback(self, callback: JobCallback, job: dict[str, Any]) -> None:
        def run() -> None:
            try:
                callback(job)
            except Exception:
                log.exception("agent %s: the on_done callback for job %s failed",
                              self._id, job.get("id"))  # fmt: skip

        pool = self._pool
        if pool is not None:
            pool.submit(run)
        else:
            run()

    def _recover_finals(self) -> None:
        """After a reconnect: read each job still waited for once over REST, in case its
        final reply came while this agent was away."""
        with self._done:
            pending = list(self._pending_jobs)
        for job_id in pending:
            try:
                job = self.job(job_id)
            except DeparrowError as e:
                log.warning("agent %s: cannot read job %s after reconnecting: %s",
                            self._id, job_id, e)  # fmt: skip
                continue
            if job["state"] in TERMINAL_STATES:
                self._on_final(job)

    def _on_call(self, msg: dict[str, Any]) -> None:
        call_id = str(msg.get("call_id"))
        with self._answer_lock:
            if call_id in self._answered:  # a re-sent call: answer it the same way again
                previous = self._answered[call_id]
                if previous is not None:
                    self._publish_response(previous)
                return
            self._answered[call_id] = None  # in progress
            while len(self._answered) > 1000:
                self._answered.popitem(last=False)
        pool = self._pool
        if pool is not None:
            pool.submit(self._answer, msg)

    def _answer(self, msg: dict[str, Any]) -> None:
        call_id = str(msg["call_id"])
        served = self._served.get(str(msg.get("service_id")))
        # Work for a call the hub has given up on is never paid (2 s of grace for clock skew).
        if time.time() * 1000 > float(msg.get("deadline_ms") or 0) + 2000:
            log.warning("call %s arrived after its deadline; not answered", call_id)
            return
        if served is None:
            response = protocol.response(
                call_id, self.token, False,
                error=f"this process of agent {self._id} does not serve {msg.get('service')}",
            )  # fmt: skip
        else:
            try:
                output = served.handler(msg.get("input"))
                json.dumps(output)  # the hub must be able to read it
                response = protocol.response(call_id, self.token, True, output)
            except Exception as e:
                log.warning("call %s to %s failed: %s", call_id, served.service.name, e)
                response = protocol.response(call_id, self.token, False,
                                             error=f"{type(e).__name__}: {e}")  # fmt: skip
        with self._answer_lock:
            self._answered[call_id] = response
        self._publish_response(response)

    def _publish_response(self, response: dict[str, Any]) -> None:
        client = self._mqtt
        if client is not None:
            topic = protocol.agent_topic(self.id, protocol.RESPONSE)
            client.publish(topic, json.dumps(response), qos=1)
