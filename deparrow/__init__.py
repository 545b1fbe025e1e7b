"""DEparrow's Python SDK for agents: wallets, jobs, and services bought and sold.

See `deparrow.agent` and docs/agents.md.
"""

from deparrow.agent import (
    Agent,
    AuthError,
    CallFailed,
    CallResult,
    DeparrowError,
    InsufficientCredits,
    JobFailed,
    NotFound,
    Service,
    Wallet,
)

__all__ = [
    "Agent",
    "AuthError",
    "CallFailed",
    "CallResult",
    "DeparrowError",
    "InsufficientCredits",
    "JobFailed",
    "NotFound",
    "Service",
    "Wallet",
]
