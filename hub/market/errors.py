"""What the market says when it cannot honour a request about a job: the API turns these into
HTTP statuses (hub/api/), the bridge into MQTT error replies. A leaf."""

from __future__ import annotations


class JobError(Exception):
    """A request about a job that cannot be honoured; the message says why."""

    field: str | None = None

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class JobNotFound(JobError):
    pass


class NotAllowed(JobError):
    pass


class JobConflict(JobError):
    """An idempotency key reused for a different request."""
