"""The agent registry's tables: agents, their services, the calls between them, notices."""

from __future__ import annotations

COMPONENT = "agents"

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "agents, services, calls, notices",
        """
        CREATE TABLE agents (
            id TEXT PRIMARY KEY REFERENCES users(id),
            owner TEXT REFERENCES users(id),
            created_at REAL NOT NULL
        );
        CREATE INDEX agents_owner ON agents(owner);
        CREATE TABLE services (
            id TEXT PRIMARY KEY,
            agent TEXT NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            description TEXT NOT NULL,
            tags TEXT NOT NULL,
            price INTEGER NOT NULL CHECK (price >= 0),
            input_schema TEXT NOT NULL,
            output_schema TEXT NOT NULL,
            timeout_s REAL NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            retired_at REAL,
            UNIQUE (agent, name)
        );
        CREATE TABLE calls (
            id TEXT PRIMARY KEY,
            service TEXT NOT NULL REFERENCES services(id),
            service_name TEXT NOT NULL,
            agent TEXT NOT NULL REFERENCES users(id),
            caller TEXT NOT NULL REFERENCES users(id),
            price INTEGER NOT NULL,
            input TEXT NOT NULL,
            output TEXT,
            error TEXT,
            state TEXT NOT NULL CHECK (state IN ('pending', 'completed', 'failed', 'timeout')),
            created_at REAL NOT NULL,
            deadline REAL NOT NULL,
            finished_at REAL,
            idem_key TEXT UNIQUE,
            request_id TEXT
        );
        CREATE INDEX calls_pending ON calls(state, deadline);
        CREATE INDEX calls_caller ON calls(caller, created_at);
        CREATE INDEX calls_agent ON calls(agent, created_at);
        CREATE TABLE agent_notices (
            id INTEGER PRIMARY KEY,
            agent TEXT NOT NULL REFERENCES users(id),
            owner TEXT,
            kind TEXT NOT NULL,
            ref TEXT NOT NULL UNIQUE,
            message TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE INDEX agent_notices_agent ON agent_notices(agent, id);
        """,
    ),
]
