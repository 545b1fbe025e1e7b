"""REST routes of jobs: uploads (blobs), submitting, reading, listing and cancelling jobs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from typing import Any

import msgspec
from aiohttp import web

from hub.api.fetch import FetchError, fetch
from hub.api.http import _services, decode_body, error, identity, json_response, query_int
from hub.api.types import (
    BlobView,
    SubmitResponse,
)
from hub.ledger.money import format_micro
from hub.market.errors import JobError, JobNotFound
from hub.market.spec import JOB_STATES, InputFile, JobSpec

log = logging.getLogger(__name__)

MAX_LIST = 500  # jobs per answer of GET /api/v1/jobs


async def upload_blob(request: web.Request) -> web.Response:
    identity(request)
    services = _services(request)
    data = await request.read()
    config = services.config
    limit = max(config.max_module_bytes, config.max_input_bytes, config.max_files_bytes)
    if not data:
        return error(400, "empty upload: send the file's bytes as the request body")
    if len(data) > limit:
        return error(413, f"upload of {len(data)} bytes is over the {limit}-byte limit")
    digest = services.store.put_blob(data)
    return json_response(BlobView(ref="sha256:" + digest, size=len(data)), 201)


async def fetch_inputs(services: Any, spec: JobSpec) -> JobSpec:
    """Fetch a spec's https:// inputs (hub/api/fetch.py: public addresses only, unless the
    operator allows others; at most max_files_bytes each) into blobs, and return the spec with
    `sha256:` references in their place. JobError naming the input when one cannot be had."""
    urls = [i for i, f in enumerate(spec.inputs) if f.ref.startswith(("https:", "http:"))]
    if not urls:
        return spec
    config = services.config
    context = None  # the system's CAs, and the operator's own where it names a file
    if config.fetch_ca_file is not None:
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=config.fetch_ca_file)

    async def one(i: int) -> bytes:
        try:
            return await fetch(
                spec.inputs[i].ref,
                max_bytes=config.max_files_bytes,
                allow_private=config.fetch_allow_private,
                ssl_context=context,
                timeout_s=config.fetch_timeout_s,
            )
        except FetchError as e:
            raise JobError(f"inputs[{i}].ref: {e}", f"inputs[{i}].ref") from None

    fetched = await asyncio.gather(*(one(i) for i in urls))
    inputs = list(spec.inputs)
    for i, data in zip(urls, fetched, strict=True):
        digest = services.store.put_blob(data)
        inputs[i] = InputFile(inputs[i].path, "sha256:" + digest)
    return msgspec.structs.replace(spec, inputs=inputs)


async def submit_job(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    spec = await fetch_inputs(services, await decode_body(request, JobSpec))
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= 128):
        return error(400, "Idempotency-Key must be 1 to 128 characters", field="Idempotency-Key")
    submit_key = "rest:" + key if key else None
    writer = services.writer
    if writer is not None and writer.running:
        # Through the writer: concurrent submissions share one durable commit (the hold and
        # the queued job), and the answer is sent only once that commit is on disk.
        job = await writer.run(lambda _c: services.jobs.submit(who.user_id, spec, submit_key))
    else:
        job = services.jobs.submit(who.user_id, spec, submit_key=submit_key)
    services.on_change("job", {"id": job["id"], "state": job["state"]})
    if services.bridge is not None:
        try:
            services.bridge.dispatch()
        except Exception:  # the job is queued and paid for; the next tick assigns it
            log.exception("dispatch after submitting %s failed", job["id"])
    return json_response(
        SubmitResponse(
            id=job["id"],
            state=job["state"],
            hold=format_micro(int(job["hold"])),
            max_price=format_micro(int(job["hold"])),
        ),
        201,
    )


def _own_job(request: web.Request) -> Any:
    who = identity(request)
    services = _services(request)
    job_id = request.match_info["job_id"]
    job = services.store.job(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    if job["owner"] != who.user_id and not who.is_admin:
        raise JobNotFound(f"no job {job_id}")  # someone else's job: don't confirm it exists
    return job


async def get_job(request: web.Request) -> web.Response:
    return json_response(_services(request).jobs.view(_own_job(request)))


async def get_output(request: web.Request) -> web.Response:
    """A file the job left under /outputs: its bytes, while the hub's retention lasts."""
    job = _own_job(request)
    services = _services(request)
    path = request.match_info["path"]
    data = services.store.job_file(job["id"], "output", path)
    if data is None:
        if job["outputs_expired_at"] is not None:
            return error(
                410,
                f"the outputs of job {job['id']} expired (kept"
                f" {services.config.output_retention_s:g}s after it ended)",
            )
        listed = [r["path"] for r in services.store.job_files(job["id"], "output")]
        have = ", ".join(listed[:20]) if listed else "none"
        return error(404, f"job {job['id']} has no output {path!r} (it has: {have})")
    return file_response(path, data)


def file_response(path: str, data: bytes) -> web.Response:
    """An output file as a download (the API's and the job page's): its name, its digest."""
    name = path.rsplit("/", 1)[-1].replace('"', "")
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Content-SHA256": hashlib.sha256(data).hexdigest(),
            "X-Content-Type-Options": "nosniff",
        },
    )


async def list_jobs(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    state = request.query.get("state")
    if state is not None and state not in JOB_STATES:
        return error(400, f"state must be one of {', '.join(JOB_STATES)}", field="state")
    limit = query_int(request, "limit", 1, MAX_LIST, default=50)
    everyone = request.query.get("all", "0")
    if everyone not in ("0", "1"):
        return error(400, f"all must be 0 or 1, not {everyone!r}", field="all")
    owner = None if who.is_admin and everyone == "1" else who.user_id
    rows = services.store.jobs(owner=owner, state=state, limit=limit)
    return json_response({"jobs": [services.jobs.view(r) for r in rows]})


async def cancel_job(request: web.Request) -> web.Response:
    who = identity(request)
    services = _services(request)
    job, node = services.jobs.cancel(who.user_id, request.match_info["job_id"], who.is_admin)
    stop = services.jobs.take_cancels()  # a verified job's replicas on their nodes
    if node:
        stop.append((node, job["id"], int(job["attempt"])))
    if services.bridge is not None:
        for node_id, job_id, attempt in stop:
            services.bridge.cancel_on_node(node_id, job_id, attempt)
    return json_response(services.jobs.view(job))
