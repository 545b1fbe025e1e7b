"""Storage rows for users, tokens, nodes, jobs and blobs (the ledger keeps its own tables).

Plain SQL over the hub's one Database; callers compose these calls inside db.transaction()
with ledger movements so a job's state and its credits change together or not at all.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from hub.store.db import Database
from hub.store.passwords import hash_password

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "users, tokens, nodes, jobs, blobs",
        """
        CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'admin', 'agent')),
            token_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL
        );
        CREATE TABLE enrollment_tokens (
            token_hash TEXT PRIMARY KEY,
            owner TEXT NOT NULL REFERENCES users(id),
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            used_by TEXT
        );
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            owner TEXT NOT NULL REFERENCES users(id),
            secret TEXT NOT NULL,
            mqtt_username TEXT NOT NULL,
            mqtt_password_hash TEXT NOT NULL,
            engines TEXT NOT NULL,
            arch TEXT NOT NULL,
            cpu REAL NOT NULL,
            memory_mb INTEGER NOT NULL,
            state TEXT NOT NULL DEFAULT 'offline',
            resources TEXT NOT NULL DEFAULT '{}',
            running TEXT NOT NULL DEFAULT '[]',
            last_seen REAL,
            last_seq INTEGER NOT NULL DEFAULT -1,
            earned INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE TABLE blobs (
            sha256 TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            data BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            node TEXT REFERENCES nodes(id),
            attempt INTEGER NOT NULL DEFAULT 0,
            priority TEXT NOT NULL,
            cpu_milli INTEGER NOT NULL,
            memory_mb INTEGER NOT NULL,
            timeout_s INTEGER NOT NULL,
            module_sha256 TEXT NOT NULL REFERENCES blobs(sha256),
            input_sha256 TEXT REFERENCES blobs(sha256),
            hold INTEGER NOT NULL,
            cost INTEGER,
            reason TEXT,
            result TEXT,
            submitted_at REAL NOT NULL,
            assigned_at REAL,
            started_at REAL,
            finished_at REAL,
            submit_key TEXT UNIQUE
        );
        CREATE INDEX jobs_state ON jobs(state, priority, submitted_at);
        CREATE INDEX jobs_owner ON jobs(owner, submitted_at);
        CREATE INDEX jobs_node ON jobs(node, state);
        """,
    ),
    (
        2,
        "uptime and referral accounting",
        """
        ALTER TABLE nodes ADD COLUMN uptime_ms INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN uptime_paid INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN proved_at REAL;
        ALTER TABLE users ADD COLUMN referred_by TEXT REFERENCES users(id);
        """,
    ),
    (
        3,
        "service jobs billed per period",
        """
        ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'batch'
            CHECK (kind IN ('batch', 'service'));
        ALTER TABLE jobs ADD COLUMN period_start REAL;
        ALTER TABLE jobs ADD COLUMN periods_billed INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX jobs_kind_state ON jobs(kind, state);
        """,
    ),
    (
        4,
        "jobs without a module (docker and native engines)",
        # SQLite cannot drop NOT NULL in place: rebuild the table, same columns and order.
        """
        CREATE TABLE jobs_new (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL REFERENCES users(id),
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            node TEXT REFERENCES nodes(id),
            attempt INTEGER NOT NULL DEFAULT 0,
            priority TEXT NOT NULL,
            cpu_milli INTEGER NOT NULL,
            memory_mb INTEGER NOT NULL,
            timeout_s INTEGER NOT NULL,
            module_sha256 TEXT REFERENCES blobs(sha256),
            input_sha256 TEXT REFERENCES blobs(sha256),
            hold INTEGER NOT NULL,
            cost INTEGER,
            reason TEXT,
            result TEXT,
            submitted_at REAL NOT NULL,
            assigned_at REAL,
            started_at REAL,
            finished_at REAL,
            submit_key TEXT UNIQUE,
            kind TEXT NOT NULL DEFAULT 'batch' CHECK (kind IN ('batch', 'service')),
            period_start REAL,
            periods_billed INTEGER NOT NULL DEFAULT 0
        );
        INSERT INTO jobs_new SELECT * FROM jobs;
        DROP TABLE jobs;
        ALTER TABLE jobs_new RENAME TO jobs;
        CREATE INDEX jobs_state ON jobs(state, priority, submitted_at);
        CREATE INDEX jobs_owner ON jobs(owner, submitted_at);
        CREATE INDEX jobs_node ON jobs(node, state);
        CREATE INDEX jobs_kind_state ON jobs(kind, state);
        """,
    ),
    (
        5,
        "broker logins: Mosquitto password hashes, revoked nodes",
        # broker_hash: the MQTT password (a user's: their API token) in Mosquitto's $7$ format,
        # written when the plaintext exists (enrollment, user creation). NULL for rows made
        # before this migration: those logins cannot be rebuilt and stay out of the broker.
        """
        ALTER TABLE nodes ADD COLUMN broker_hash TEXT;
        ALTER TABLE nodes ADD COLUMN revoked_at REAL;
        ALTER TABLE users ADD COLUMN broker_hash TEXT;
        """,
    ),
    (
        6,
        "verification by replicas, retries, node reputation",
        # A verified job (replicas = k > 1) holds the credits; its k replicas are job rows of
        # their own (parent = the job, replica = 1..k, hold 0) that the scheduler places on
        # nodes of distinct owners and that nodes run like any job. failures/tries: attempts
        # lost to a node (offline, restarted, silent, crashed), retried up to a maximum.
        """
        ALTER TABLE jobs ADD COLUMN parent TEXT REFERENCES jobs(id);
        ALTER TABLE jobs ADD COLUMN replica INTEGER;
        ALTER TABLE jobs ADD COLUMN replicas INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE jobs ADD COLUMN result_hash TEXT;
        ALTER TABLE jobs ADD COLUMN billed_ms INTEGER;
        ALTER TABLE jobs ADD COLUMN verdict TEXT;
        ALTER TABLE jobs ADD COLUMN paid INTEGER;
        ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN tries TEXT NOT NULL DEFAULT '[]';
        CREATE INDEX jobs_parent ON jobs(parent, replica) WHERE parent IS NOT NULL;
        ALTER TABLE nodes ADD COLUMN reputation REAL NOT NULL DEFAULT 0.5;
        ALTER TABLE nodes ADD COLUMN jobs_completed INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN replicas_agreed INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN replicas_dissented INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN jobs_lost INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX nodes_preference ON nodes(reputation DESC, created_at);
        """,
    ),
    (
        7,
        "attempts settled once, queue wait from the last queueing, uptime earned by proof",
        # attempts: one row per time a job was given to a node (hub/market/attempts.py); its
        # outcome is written once, and only the step that writes it moves that attempt's
        # credits.
        # period_from: the service periods billed before the attempt began. queued_at: when
        # the job last entered the queue (submission or retry), for the queue's time limit.
        # Uptime: availability of the current UTC day waits in uptime_pending_ms until the node
        # proves itself that day (proved_day); uptime_owner_day caps it per human account.
        """
        CREATE TABLE attempts (
            job TEXT NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            node TEXT,
            started_at REAL NOT NULL,
            period_from INTEGER NOT NULL DEFAULT 0,
            outcome TEXT,
            ended_at REAL,
            wall_ms INTEGER,
            error TEXT,
            charge INTEGER NOT NULL DEFAULT 0,
            pay INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (job, attempt)
        ) WITHOUT ROWID;
        ALTER TABLE jobs ADD COLUMN queued_at REAL;
        UPDATE jobs SET queued_at = submitted_at WHERE state = 'queued';
        ALTER TABLE nodes ADD COLUMN uptime_day INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN uptime_pending_ms INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN proved_day INTEGER NOT NULL DEFAULT -1;
        CREATE TABLE uptime_owner_day (
            owner TEXT NOT NULL,
            day INTEGER NOT NULL,
            paid INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (owner, day)
        ) WITHOUT ROWID;
        """,
    ),
    (
        8,
        "the engines whose jobs may use the network on each node",
        # From the node's hello and heartbeats (`allow_network`, a JSON list of engine names).
        # A node that never said (older software) allows none: a job that asks for network
        # access never goes to a node whose owner did not say yes.
        """
        ALTER TABLE nodes ADD COLUMN allow_network TEXT NOT NULL DEFAULT '[]';
        """,
    ),
    (
        9,
        "the final reply owed to an agent that submitted a job over MQTT",
        # reply_to: the request_id of the agent's `submit` (NULL for jobs submitted over REST,
        # and for replicas). final_sent_at: when the broker acknowledged the job's final reply
        # (hub/mqtt/finals.py). A finished job with reply_to and no final_sent_at still owes its
        # agent that reply: the partial index holds exactly those, so the bridge looks for them
        # after every batch at no cost however many jobs the hub has done.
        """
        ALTER TABLE jobs ADD COLUMN reply_to TEXT;
        ALTER TABLE jobs ADD COLUMN final_sent_at REAL;
        CREATE INDEX jobs_final_owed ON jobs(finished_at)
            WHERE reply_to IS NOT NULL AND final_sent_at IS NULL
            AND state IN ('completed', 'failed', 'cancelled');
        """,
    ),
    (
        10,
        "job files: inputs and outputs, what file jobs each node takes, blobs collected",
        # job_files: a file job's inputs (seen under /inputs) and outputs (what it left under
        # /outputs), each a blob. An output's row goes when its retention is over (the job's
        # result keeps listing it, as expired); a blob no job, file or recent upload refers to
        # is collected (hub/market/retention.py). jobs.files_bytes: the input bytes of a file
        # job (NULL: not a file job), matched against what a node takes. nodes.files: the
        # `files` of its hello (JSON), NULL for none.
        """
        CREATE TABLE job_files (
            job TEXT NOT NULL REFERENCES jobs(id),
            role TEXT NOT NULL CHECK (role IN ('input', 'output')),
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL REFERENCES blobs(sha256),
            size INTEGER NOT NULL,
            PRIMARY KEY (job, role, path)
        ) WITHOUT ROWID;
        CREATE INDEX job_files_blob ON job_files(sha256);
        ALTER TABLE jobs ADD COLUMN files_bytes INTEGER;
        ALTER TABLE jobs ADD COLUMN outputs_expired_at REAL;
        ALTER TABLE nodes ADD COLUMN files TEXT;
        CREATE INDEX blobs_created ON blobs(created_at);
        CREATE INDEX jobs_module ON jobs(module_sha256);
        CREATE INDEX jobs_input ON jobs(input_sha256) WHERE input_sha256 IS NOT NULL;
        CREATE INDEX jobs_files_kept ON jobs(finished_at)
            WHERE files_bytes IS NOT NULL AND outputs_expired_at IS NULL;
        """,
    ),
    (
        11,
        "slots, GPUs and fair spreading",
        # nodes.slots: how many jobs the node runs at once (its hello; 1 for a board or an
        # older node). nodes.gpus: the GPUs it has, from its hello (JSON list, NULL: none).
        # nodes.free: what its last heartbeat said is free (JSON). nodes.last_job_at: when
        # the hub last gave it a job, so that equally good nodes take turns. jobs.gpu: the
        # GPUs a job asked for.
        """
        ALTER TABLE nodes ADD COLUMN slots INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE nodes ADD COLUMN gpus TEXT;
        ALTER TABLE nodes ADD COLUMN free TEXT;
        ALTER TABLE nodes ADD COLUMN last_job_at REAL;
        ALTER TABLE jobs ADD COLUMN gpu INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX jobs_live_node ON jobs(node) WHERE state IN ('assigned', 'running');
        """,
    ),
    (
        12,
        "the largest message a node takes",
        # nodes.max_message: the `max_message` of its hello (bytes; a board's share of its
        # heap), NULL for no limit of its own. jobs.message_bytes: how large the job's
        # assignment is, at most (hub/market/admission.py); NULL for jobs from before.
        """
        ALTER TABLE nodes ADD COLUMN max_message INTEGER;
        ALTER TABLE jobs ADD COLUMN message_bytes INTEGER;
        """,
    ),
    (
        13,
        "why a suspended node waits",
        # nodes.suspended: while a node is suspended, what its heartbeat said (JSON: why, and
        # resume_at, the hub time it may run jobs again at the earliest, or null); else NULL.
        "ALTER TABLE nodes ADD COLUMN suspended TEXT;",
    ),
    (
        14,
        "settings every replica shares",
        # Secrets that hub replicas sharing this store must agree on (the JWT signing key), made
        # by the first replica that asks (Store.shared_secret). A hub on SQLite keeps its key
        # in its data directory instead.
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);",
    ),
]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(prefix: str) -> str:
    return prefix + "_" + secrets.token_hex(8)


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.clock: Callable[[], float] = time.time  # the hub's (Jobs sets it): blobs' times
        db.migrate("store", MIGRATIONS)

    def shared_secret(self, name: str) -> str:
        """A random secret every replica on this store uses, made by the first that asks."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)",
                (name, secrets.token_hex(32)),
            )
            row = c.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return str(row[0])

    # --- users -------------------------------------------------------------
    def create_user(self, name: str, role: str, referred_by: str | None = None) -> tuple[str, str]:
        """Returns (user id, API token). Only hashes of the token are stored: sha256 for the
        API, and Mosquitto's for the broker, where the token is the user's MQTT password."""
        user_id = new_id("u")
        token = "dpt_" + secrets.token_urlsafe(24)
        broker_hash = hash_password(token)
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO users (id, name, role, token_hash, created_at, referred_by,"
                " broker_hash) VALUES (?,?,?,?,?,?,?)",
                (user_id, name, role, token_hash(token), time.time(), referred_by, broker_hash),
            )
        return user_id, token

    def user_by_token(self, token: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM users WHERE token_hash = ?", (token_hash(token),))

    def user(self, user_id: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM users WHERE id = ?", (user_id,))

    def fill_broker_hash(self, user_id: str, token: str) -> bool:
        """A user from before broker logins (store migration 5) gets theirs the first time
        their token is shown to the hub. True when one was written."""
        broker_hash = hash_password(token)  # PBKDF2: outside the write lock
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE users SET broker_hash = ? WHERE id = ? AND broker_hash IS NULL",
                (broker_hash, user_id),
            )
            return cur.rowcount == 1

    def users(self) -> list[sqlite3.Row]:
        return self.db.query("SELECT * FROM users ORDER BY created_at")

    # --- enrollment ----------------------------------------------------------
    def create_enrollment_token(self, owner: str, ttl_s: int) -> tuple[str, float]:
        token = "dpe_" + secrets.token_urlsafe(24)
        now = time.time()
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO enrollment_tokens (token_hash, owner, created_at, expires_at)"
                " VALUES (?,?,?,?)",
                (token_hash(token), owner, now, now + ttl_s),
            )
        return token, now + ttl_s

    def enrollment_token(self, token: str) -> sqlite3.Row | None:
        return self.db.query_one(
            "SELECT * FROM enrollment_tokens WHERE token_hash = ?", (token_hash(token),)
        )

    def create_node(
        self,
        *,
        token: str,
        owner: str,
        name: str,
        engines: list[str],
        arch: str,
        cpu: float,
        memory_mb: int,
        mqtt_password: str,
    ) -> tuple[str, str]:
        """Consume the enrollment token and register the node: returns (node id, secret)."""
        node_id = new_id("n")
        secret = secrets.token_hex(32)
        broker_hash = hash_password(mqtt_password)  # PBKDF2: outside the write lock
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE enrollment_tokens SET used_by = ? WHERE token_hash = ? AND used_by IS NULL",
                (node_id, token_hash(token)),
            )
            if cur.rowcount != 1:
                raise ValueError("enrollment token was already used")
            c.execute(
                "INSERT INTO nodes (id, name, owner, secret, mqtt_username, mqtt_password_hash,"
                " broker_hash, engines, arch, cpu, memory_mb, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    node_id,
                    name,
                    owner,
                    secret,
                    node_id,
                    token_hash(mqtt_password),
                    broker_hash,
                    json.dumps(engines),
                    arch,
                    cpu,
                    memory_mb,
                    time.time(),
                ),
            )
        return node_id, secret

    # --- nodes ---------------------------------------------------------------
    def node(self, node_id: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM nodes WHERE id = ?", (node_id,))

    def nodes(self, owner: str | None = None) -> list[sqlite3.Row]:
        if owner is None:
            return self.db.query("SELECT * FROM nodes ORDER BY created_at")
        return self.db.query("SELECT * FROM nodes WHERE owner = ? ORDER BY created_at", (owner,))

    def update_node(self, node_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.db.transaction() as c:
            c.execute(f"UPDATE nodes SET {cols} WHERE id = ?", (*fields.values(), node_id))

    def revoke_node(self, node_id: str) -> bool:
        """Take the node's broker login away (its history stays). False if no such node."""
        with self.db.transaction() as c:
            cur = c.execute(
                "UPDATE nodes SET revoked_at = ?, state = 'offline' WHERE id = ?"
                " AND revoked_at IS NULL",
                (time.time(), node_id),
            )
        return cur.rowcount == 1

    def broker_logins(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(node id, hash) of every node that may use the broker, (user id, hash) of users."""
        nodes = self.db.query(
            "SELECT id, broker_hash FROM nodes WHERE broker_hash IS NOT NULL"
            " AND revoked_at IS NULL ORDER BY created_at, id"
        )
        users = self.db.query(
            "SELECT id, broker_hash FROM users WHERE broker_hash IS NOT NULL"
            " ORDER BY created_at, id"
        )
        return (
            [(str(r["id"]), str(r["broker_hash"])) for r in nodes],
            [(str(r["id"]), str(r["broker_hash"])) for r in users],
        )

    def logins_without_broker_hash(self) -> int:
        """Nodes and users from before broker logins: they cannot log in to the hub's broker."""
        row = self.db.query_one(
            "SELECT (SELECT count(*) FROM nodes WHERE broker_hash IS NULL AND revoked_at IS NULL)"
            " + (SELECT count(*) FROM users WHERE broker_hash IS NULL) AS n"
        )
        return int(row["n"]) if row is not None else 0

    def touch_nodes(self) -> None:
        with self.db.transaction() as c:
            c.execute("UPDATE nodes SET last_seen = ? WHERE state != 'offline'", (time.time(),))

    # --- blobs ---------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        """Store bytes under their sha256. Storing them again renews their time: an upload
        nothing refers to yet is kept for the hub's blob_grace_s from its latest upload."""
        digest = hashlib.sha256(data).hexdigest()
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO blobs (sha256, size, data, created_at) VALUES (?,?,?,?)"
                " ON CONFLICT (sha256) DO UPDATE SET created_at = excluded.created_at",
                (digest, len(data), data, self.clock()),
            )
        return digest

    def blob_size(self, digest: str) -> int:
        row = self.db.query_one("SELECT size FROM blobs WHERE sha256 = ?", (digest,))
        return int(row["size"]) if row else 0

    def job_files(self, job_id: str, role: str) -> list[sqlite3.Row]:
        """A job's input or output files (path, sha256, size), in path order."""
        return self.db.query(
            "SELECT path, sha256, size FROM job_files WHERE job = ? AND role = ? ORDER BY path",
            (job_id, role),
        )

    def job_file(self, job_id: str, role: str, path: str) -> bytes | None:
        row = self.db.query_one(
            "SELECT b.data FROM job_files f JOIN blobs b ON b.sha256 = f.sha256"
            " WHERE f.job = ? AND f.role = ? AND f.path = ?",
            (job_id, role, path),
        )
        return bytes(row["data"]) if row else None

    def blob(self, digest: str) -> bytes | None:
        row = self.db.query_one("SELECT data FROM blobs WHERE sha256 = ?", (digest,))
        return bytes(row["data"]) if row else None

    def blob_facts(self, digest: str, n: int) -> tuple[int, bytes] | None:
        """A blob's size and its first n bytes (fewer when it is shorter; b"" when it is empty:
        SQLite's substr of an empty blob is NULL), in one read; None when there is no such
        blob."""
        row = self.db.query_one(
            "SELECT size, substr(data, 1, ?) AS h FROM blobs WHERE sha256 = ?", (n, digest)
        )
        return None if row is None else (int(row["size"]), bytes(row["h"] or b""))

    def has_blob(self, digest: str) -> bool:
        return self.db.query_one("SELECT 1 FROM blobs WHERE sha256 = ?", (digest,)) is not None

    # --- jobs ----------------------------------------------------------------
    def job(self, job_id: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def job_by_submit_key(self, owner: str, key: str) -> sqlite3.Row | None:
        return self.db.query_one("SELECT * FROM jobs WHERE submit_key = ?", (owner + ":" + key,))

    def jobs(
        self, owner: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[sqlite3.Row]:
        where, params = [], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        where.append("parent IS NULL")  # a verified job's replicas show inside it
        sql = "SELECT * FROM jobs WHERE " + " AND ".join(where)
        sql += " ORDER BY submitted_at DESC LIMIT ?"
        return self.db.query(sql, (*params, limit))

    def queued_jobs(self) -> list[sqlite3.Row]:
        return self.db.query(
            "SELECT * FROM jobs WHERE state = 'queued' AND replicas = 1"
            " ORDER BY CASE priority WHEN 'high' THEN 0 ELSE 1 END, submitted_at"
        )

    def active_jobs(self) -> list[sqlite3.Row]:
        """Jobs on a node now (a verified job is on none: its replicas are)."""
        return self.db.query(
            "SELECT * FROM jobs WHERE state IN ('assigned', 'running') AND node IS NOT NULL"
        )

    def replicas(self, job_id: str) -> list[sqlite3.Row]:
        """The replicas of a verified job, in order."""
        return self.db.query("SELECT * FROM jobs WHERE parent = ? ORDER BY replica", (job_id,))

    def running_services(self) -> list[sqlite3.Row]:
        return self.db.query(
            "SELECT * FROM jobs WHERE kind = 'service' AND state = 'running'"
            " AND period_start IS NOT NULL"
        )

    def human_of(self, user_id: str) -> str:
        """The person behind an account: an agent's owner (an agent's agent's, and so on), or
        the user itself. Credits that reward people (uptime caps, referrals, distinct owners
        of replicas) count a person's agents as that person."""
        row = self.db.query_one(
            "WITH RECURSIVE up(id, depth) AS (SELECT ?, 0 UNION ALL"
            " SELECT a.owner, up.depth + 1 FROM agents a JOIN up ON a.id = up.id"
            " WHERE a.owner IS NOT NULL AND up.depth < 16)"
            " SELECT id FROM up ORDER BY depth DESC LIMIT 1",
            (user_id,),
        )
        return str(row["id"]) if row is not None else user_id

    def humans(
        self, query: Callable[[str, Sequence[Any]], Sequence[Any]] | None = None
    ) -> dict[str, str]:
        """Every agent's person (as human_of), in one query: for a scheduling pass. query: how
        to read (by default the hub's connection; a plan made in a thread reads on its own)."""
        q = query if query is not None else self.db.query
        rows = q("SELECT id, owner FROM agents WHERE owner IS NOT NULL", ())
        parent = {str(r["id"]): str(r["owner"]) for r in rows}
        out: dict[str, str] = {}
        for agent in parent:
            who, seen = agent, 0
            while who in parent and seen < 16:
                who, seen = parent[who], seen + 1
            out[agent] = who
        return out

    # --- final replies to agents (hub/mqtt/finals.py) ----------------------------------------
    def reply_over_mqtt(self, job_id: str, request_id: str) -> None:
        """The job was submitted over MQTT with request_id: it owes its agent a final reply."""
        with self.db.transaction() as c:
            c.execute(
                "UPDATE jobs SET reply_to = ? WHERE id = ? AND reply_to IS NULL",
                (request_id, job_id),
            )

    def finals_owed(self, limit: int) -> list[sqlite3.Row]:
        """Finished jobs whose final reply the broker has not acknowledged, oldest first."""
        # INDEXED BY: without it SQLite picks jobs_state and reads every finished job there is.
        return self.db.query(
            "SELECT * FROM jobs INDEXED BY jobs_final_owed"
            " WHERE reply_to IS NOT NULL AND final_sent_at IS NULL"
            " AND state IN ('completed', 'failed', 'cancelled') ORDER BY finished_at LIMIT ?",
            (limit,),
        )

    def finals_sent(self, job_ids: list[str], now: float) -> None:
        with self.db.transaction() as c:
            c.executemany(
                "UPDATE jobs SET final_sent_at = ? WHERE id = ? AND final_sent_at IS NULL",
                [(now, j) for j in job_ids],
            )

    def jobs_on_node(self, node_id: str) -> list[sqlite3.Row]:
        return self.db.query(
            "SELECT * FROM jobs WHERE node = ? AND state IN ('assigned', 'running')", (node_id,)
        )
