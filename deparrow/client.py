"""A small synchronous client for the hub's REST API, used by the CLI and the demo."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote

from deparrow.bootstrap import NOT_SENT, Replicas, failure, resendable
from edge.bootstrap import BootstrapError, fetch_one
from edge.cli_files import save_output
from edge.enroll import (
    EnrollError,
    fetch_ca_pem,
    is_pin,
    pem_fingerprint,
    tls_context,
    untrusted,
)

# The states a job ends in, as the REST API reports them (the job lifecycle in
# docs/protocol.md). The client keeps its own copy so it never imports the server;
# tests/test_cli.py checks it against hub.market.spec.TERMINAL_STATES.
TERMINAL_STATES = ("completed", "failed", "cancelled")
UPLOAD_CHUNK = 256 * 1024  # bytes sent between two calls of an upload's progress
T = TypeVar("T")


class HubError(Exception):
    """The hub answered with an error (status and message), or could not be reached."""

    def __init__(
        self,
        message: str,
        status: int = 0,
        body: dict[str, Any] | None = None,
        failover: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}
        # How the request failed, when another replica might do better (deparrow/bootstrap.py)
        self.failover = failover


class Client:
    """ca: for an https:// hub, the CA to trust: a PEM file, or "sha256:<hex>" to fetch the
    hub's CA and trust it only if it has that fingerprint (docs/tls.md). None: the system's
    CAs (a hub with a Let's Encrypt certificate, or one behind a reverse proxy).

    bootstrap: the URL(s) of the hub's replicas (comma-separated), instead of hub: the client
    uses the best replica that answers and moves to the next when one fails, sending again
    only what is safe to send twice (deparrow/bootstrap.py); region: prefer its replicas."""

    def __init__(
        self,
        hub: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
        ca: str | None = None,
        *,
        bootstrap: str | None = None,
        region: str | None = None,
    ) -> None:
        self.token = token
        self.timeout_s = timeout_s
        self.ca = ca
        self._jwt: str | None = None
        self._jwt_exp = 0
        self._context: ssl.SSLContext | None = None
        self.replicas: Replicas | None = None
        if bootstrap:
            try:
                self.replicas = Replicas(
                    bootstrap, region=region, timeout_s=min(timeout_s, 10.0),
                    fetch_list=self._fetch_list,
                )  # fmt: skip
            except ValueError as e:
                raise HubError(str(e)) from None
        if hub is None and self.replicas is None:
            raise HubError("a hub URL or a bootstrap URL is needed")
        self._hub = hub.rstrip("/") if hub else None

    @property
    def hub(self) -> str:
        """The replica in use: the hub given, else the best one the bootstrap URL lists."""
        if self._hub is None:
            assert self.replicas is not None
            try:
                self._hub = self.replicas.first()
            except BootstrapError as e:
                raise HubError(str(e)) from None
        return self._hub

    @hub.setter
    def hub(self, url: str) -> None:
        self._hub = url.rstrip("/")

    def _fetch_list(self, urls: list[str]) -> dict[str, Any]:
        """The bootstrap list from the first of urls that answers, verified as requests are."""
        assert self.replicas is not None
        problems = []
        for url in urls:
            try:
                context = Client(url, ca=self.ca, timeout_s=self.replicas.timeout_s).ssl_context()
                return fetch_one(url, self.replicas.region, self.replicas.timeout_s, context)
            except urllib.error.HTTPError as e:
                problems.append(f"{url}: HTTP {e.code}")
            except (HubError, OSError, ValueError) as e:
                problems.append(f"{url}: {getattr(e, 'reason', e)}")
        raise BootstrapError(
            "no replica answered with the hub's replica list (" + "; ".join(problems) + ")"
        )

    def _move_on(self, tried: list[str], error: HubError) -> None:
        """After a replica failed: use the next one (HubError when none is left)."""
        assert self.replicas is not None
        nxt = self.replicas.next(tried)
        if nxt is None:
            raise HubError(
                f"{error}; no other replica of the hub answers (tried {', '.join(tried)})",
                error.status, error.body,
            )  # fmt: skip
        self._hub = nxt
        self._context = None  # each replica is verified on its own
        self._jwt = None  # signed in again: a replica on another store has another JWT key

    def _failing_over(self, method: str, path: str, headers: dict[str, str] | None,
                      send: Callable[[], T]) -> T:  # fmt: skip
        """send() on this replica, then on the next ones while the failure allows it."""
        if self.replicas is None:
            return send()
        tried: list[str] = []
        while True:
            try:
                return send()
            except HubError as e:
                if e.failover is None or (
                    e.failover != NOT_SENT and not resendable(method, path, headers)
                ):
                    if e.failover is not None:
                        raise HubError(
                            f"{e}: {method} {path} may or may not have been done on "
                            f"{self.hub}, and sending it again is not safe; look before "
                            "retrying", e.status, e.body, e.failover,
                        ) from None  # fmt: skip
                    raise
                tried.append(self.hub)
                self._move_on(tried, e)

    def ssl_context(self) -> ssl.SSLContext | None:
        """How this client verifies the hub; None for an http:// hub. Made on first use (a
        fingerprint costs one request) and kept."""
        if not self.hub.lower().startswith("https://"):
            return None
        if self._context is None:
            try:
                if self.ca is not None and is_pin(self.ca):
                    pem = fetch_ca_pem(self.hub, self.ca, self.timeout_s)
                    self._context = tls_context(ca_pem=pem)
                elif self.ca is not None:
                    with open(self.ca) as f:
                        pem_fingerprint(f.read())  # a clear error for a file that is no CA
                    self._context = tls_context(ca_file=self.ca)
                else:
                    self._context = tls_context()
            except EnrollError as e:
                raise HubError(str(e)) from None
            except (ValueError, ssl.SSLError):  # SSLError is an OSError too: first
                raise HubError(
                    f"{self.ca} holds no PEM certificate; --ca takes the hub's CA file or its "
                    "sha256: fingerprint"
                ) from None
            except OSError as e:
                raise HubError(f"cannot read the CA file {self.ca}: {e.strerror or e}") from None
        return self._context

    def _unreachable(self, e: Exception) -> HubError:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLCertVerificationError):
            why = untrusted(reason, self.hub, self.ca is not None)
            return HubError(f"cannot reach the hub at {self.hub}: {why} (env DEPARROW_CA)")
        return HubError(f"cannot reach the hub at {self.hub}: {reason}", failover=failure(e))

    def request_text(self, method: str, path: str) -> str:
        return self._failing_over(method, path, None, lambda: self._text_once(method, path))

    def _text_once(self, method: str, path: str) -> str:
        req = urllib.request.Request(
            self.hub + path, method=method, headers={"Authorization": "Bearer " + self.jwt()}
        )
        try:
            with urllib.request.urlopen(
                req, timeout=self.timeout_s, context=self.ssl_context()
            ) as resp:
                return str(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise HubError(str(e.reason), e.code, failover=failure(e)) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        auth: bool = True,
        headers: dict[str, str] | None = None,
    ) -> Any:
        hdrs = dict(headers or {})
        data = None
        if raw is not None:
            data = raw
            hdrs["Content-Type"] = "application/octet-stream"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        payload, _ = self._send(method, path, data, hdrs, auth)
        return json.loads(payload) if payload else None

    def _send(
        self,
        method: str,
        path: str,
        data: bytes | Callable[[], Iterator[bytes]] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[bytes, dict[str, str]]:
        """One request: the answer's body and headers, or HubError with the hub's message.
        With a bootstrap URL, on the next replica too when this one fails and sending it
        again is safe. data: the body, or a function making its chunks (called per try)."""
        return self._failing_over(
            method, path, headers, lambda: self._send_once(method, path, data, headers, auth)
        )

    def _send_once(
        self,
        method: str,
        path: str,
        data: bytes | Callable[[], Iterator[bytes]] | None,
        headers: dict[str, str] | None,
        auth: bool,
    ) -> tuple[bytes, dict[str, str]]:
        hdrs = dict(headers or {})
        if auth:
            hdrs["Authorization"] = "Bearer " + self.jwt()
        body = data() if callable(data) else data
        req = urllib.request.Request(self.hub + path, data=body, method=method, headers=hdrs)
        context = self.ssl_context()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=context) as resp:
                return resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())
            except ValueError:
                err = {"error": str(e.reason)}
            raise HubError(
                str(err.get("error") or e.reason), e.code, err, failover=failure(e)
            ) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise self._unreachable(e) from None

    def jwt(self) -> str:
        if self._jwt and time.time() < self._jwt_exp - 30:
            return self._jwt
        if not self.token:
            raise HubError(
                "no API token: pass --token TOKEN or set DEPARROW_TOKEN; for a hub on this "
                "machine started with --data-dir DIR, `deparrow --data-dir DIR …` reads its "
                "admin token from DIR/admin-token"
            )
        answer = self.request("POST", "/api/v1/auth/token", {"token": self.token}, auth=False)
        self._jwt, self._jwt_exp = answer["jwt"], int(answer["expires_at"])
        return str(self._jwt)

    # --- calls ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/api/v1/status", auth=False)
        return result

    def wallet(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/api/v1/wallet")
        return result

    def history(self, limit: int = 50, before: int | None = None) -> dict[str, Any]:
        q = f"?limit={limit}" + (f"&before={before}" if before is not None else "")
        result: dict[str, Any] = self.request("GET", "/api/v1/wallet/history" + q)
        return result

    def history_csv(self, limit: int = 1000) -> str:
        return self.request_text("GET", f"/api/v1/wallet/history?format=csv&limit={limit}")

    def transfer(self, to: str, amount: str, key: str, memo: str = "") -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", "/api/v1/wallet/transfer", {"to": to, "amount": amount, "memo": memo},
            headers={"Idempotency-Key": key},
        )  # fmt: skip
        return result

    def audit(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/api/v1/ledger/audit")
        return result

    def upload(self, data: bytes, progress: Callable[[int, int], None] | None = None) -> str:
        """Store data on the hub as a blob; returns its reference, "sha256:<hex>". progress,
        when given, is called with (bytes sent, total) as the upload goes."""
        if progress is None:
            return str(self.request("POST", "/api/v1/blobs", raw=data)["ref"])

        def chunks() -> Iterator[bytes]:
            view = memoryview(data)
            for start in range(0, len(data), UPLOAD_CHUNK):
                yield bytes(view[start : start + UPLOAD_CHUNK])
                progress(min(start + UPLOAD_CHUNK, len(data)), len(data))

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),  # sent as it is, not chunked
        }
        payload, _ = self._send("POST", "/api/v1/blobs", chunks, headers)
        return str(json.loads(payload)["ref"])

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job. Without an idempotency_key one is made, so that a submission whose
        answer was lost with a replica can be sent again to another without a second job."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        result: dict[str, Any] = self.request("POST", "/api/v1/jobs", spec, headers=headers)
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/api/v1/jobs/{job_id}")
        return result

    def output(self, job_id: str, path: str) -> bytes:
        """The bytes of a file the job left under /outputs (path relative to /outputs),
        checked against the digest the hub sends. HubError with the hub's message: 404 for a
        path the job has no output at, 410 once the hub's retention of them is over."""
        data, headers = self._send(
            "GET", f"/api/v1/jobs/{quote(job_id, safe='')}/outputs/{quote(path)}"
        )
        digest = {k.lower(): v for k, v in headers.items()}.get("x-content-sha256")
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise HubError(f"output {path} of job {job_id} arrived damaged (sha256 differs)")
        return data

    def download_outputs(
        self,
        job: dict[str, Any],
        dest_dir: str | os.PathLike[str],
        on_file: Callable[[str, int], None] | None = None,
    ) -> list[tuple[str, int]]:
        """Download the outputs a finished job lists (its view, from job() or wait()) into
        dest_dir, made if missing, subfolders too: each checked against the size and sha256
        the job lists and written through a temporary file renamed into place. on_file(path,
        size) is called as each is saved. Returns [(path, size)].

        Raises HubError: from the hub (410 once its retention of them is over), for bytes
        that are not what the job lists, for a path that would land outside dest_dir (a
        symlink there), or when the disk refuses. Files saved before the error stay."""
        outputs = (job.get("result") or {}).get("outputs") or []
        saved = []
        for f in outputs:
            data = self.output(str(job["id"]), f["path"])
            if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise HubError(
                    f"output {f['path']} of job {job['id']} is not the size and sha256 its "
                    "job lists; nothing was written for it"
                )
            try:
                os.makedirs(dest_dir, exist_ok=True)
                save_output(os.fspath(dest_dir), f["path"], data)
            except ValueError as e:
                raise HubError(f"{e}: not saved") from None
            except OSError as e:
                where = e.filename or dest_dir
                raise HubError(f"cannot save output {f['path']} at {where}: {e.strerror}") from None
            saved.append((str(f["path"]), len(data)))
            if on_file is not None:
                on_file(f["path"], len(data))
        return saved

    def jobs(self, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = f"?limit={limit}" + (f"&state={state}" if state else "")
        return list(self.request("GET", "/api/v1/jobs" + q)["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/api/v1/jobs/{job_id}/cancel")
        return result

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/api/v1/nodes")["nodes"])

    def remove_node(self, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("DELETE", f"/api/v1/nodes/{node_id}")
        return result

    def enrollment_token(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/api/v1/enrollment-tokens")
        return result

    def create_user(
        self, name: str, role: str = "user", referred_by: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "role": role}
        if referred_by:
            body["referred_by"] = referred_by
        result: dict[str, Any] = self.request("POST", "/api/v1/users", body)
        return result

    def wait(
        self,
        job_id: str,
        timeout_s: float = 300.0,
        poll_s: float = 0.1,
        on_view: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is completed, failed or cancelled. on_view sees each view of
        the job polled, so a caller can say why it is queued as soon as the hub knows."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_view is not None:
                on_view(job)
            if job["state"] in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise HubError(
                    f"job {job_id} still {job['state']} after {timeout_s:g}s"
                    + (f" ({job['reason']})" if job.get("reason") else "")
                )
            time.sleep(poll_s)
