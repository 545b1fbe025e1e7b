"""A throwaway PostgreSQL server: initdb in a temporary directory, a real server on a free
loopback port, removed on stop. For tests, benches and trying `--db postgresql://` locally.

PostgreSQL refuses to run as root; as root (CI), the server runs as the `postgres` user that
Debian's package creates, and its directory belongs to that user.

    with LocalPostgres() as pg:
        url = pg.create_database("hub")   # postgresql://postgres@127.0.0.1:PORT/hub
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from deparrow.localnet import free_port


class PostgresMissing(RuntimeError):
    pass


def find_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's versioned directory."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    raise PostgresMissing(
        f"PostgreSQL's {name} was not found: install it with `apt-get install postgresql-15`"
        " (`make test` does)"
    )


class LocalPostgres:
    """One PostgreSQL server of our own; `url(db)` for a database on it."""

    def __init__(self, *, fast: bool = True) -> None:
        # fast: no fsync, for tests and benches whose data may vanish with the machine.
        self.fast = fast
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="deparrow-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as: list[str] = []
        self._started = False

    def _run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            tail = ""
            if self.log.exists():
                tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}{tail}"
            )
        return r

    def start(self) -> LocalPostgres:
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")  # Debian's package makes it
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-locale", "-E", "UTF8", "--no-sync")  # fmt: skip
        opts = [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.dir}",
            "-c max_connections=200",
        ]
        if self.fast:
            opts += ["-c fsync=off", "-c full_page_writes=off", "-c synchronous_commit=off"]
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", " ".join(opts), "start")  # fmt: skip
        self._started = True
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self._started:
            self._started = False
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(find_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
