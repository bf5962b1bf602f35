"""A throw-away PostgreSQL server on 127.0.0.1, for the tests and the benchmarks.

The server is Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``), run from a
throw-away data directory: it listens on 127.0.0.1 only, on a free port, with trust authentication
for loopback connections, and its unix socket sits in the same temporary directory. PostgreSQL
refuses to run as root, so under root (as in CI) ``initdb`` and ``pg_ctl`` run as the ``postgres``
system user the package creates; otherwise as the current user. Durability is switched off (no
fsync): nothing here must survive a crash, and it makes each ``CREATE DATABASE`` cheap.

```python
bin_dir = find_bin_dir()  # None without the binaries
server = PostgresServer(bin_dir)
server.start()
url = server.url(server.create_database())  # postgresql+asyncpg://...
server.stop()  # and the directory is gone
```
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from devkit.ports import free_port

BIN_GLOB = "/usr/lib/postgresql/*/bin"
SUPERUSER = "postgres"  # the database superuser initdb creates, whoever runs the server
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """This machine cannot run the server (no binaries, or no user to run them as under root)."""


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binaries directory that has ``initdb`` and ``pg_ctl``."""

    def version(path: Path) -> tuple[int, ...]:
        name = path.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    found = [p for p in Path("/").glob(BIN_GLOB.lstrip("/")) if (p / "initdb").is_file()]
    found = [p for p in found if (p / "pg_ctl").is_file() and (p / "psql").is_file()]
    return max(found, key=version) if found else None


class PostgresServer:
    """One running PostgreSQL cluster in a temporary directory; :meth:`stop` removes it all."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.host = "127.0.0.1"
        # Not under pytest's basetemp: that is private to the current user, and the server may run
        # as another one. mkdtemp makes it 0700; it is handed to the server's user below.
        self.root = Path(tempfile.mkdtemp(prefix="llmlb-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise PostgresUnavailable(
                    "running as root and there is no 'postgres' system user to run PostgreSQL as"
                ) from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        command = [*self._as_user, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}\n{log}"
            )

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        self._initdb()
        self.resume()

    def _initdb(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            f"--pgdata={self.data_dir}",
            f"--username={SUPERUSER}",
            "--auth=trust",  # the pg_hba.conf initdb writes lists only loopback and the unix socket
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )

    def resume(self) -> None:
        """Start the server on its existing data directory, same port; wait until it accepts connections."""
        options = " ".join(
            (
                f"-c listen_addresses={self.host}",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            )
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            f"--pgdata={self.data_dir}",
            f"--log={self.log_path}",
            f"--options={options}",
            "--wait",
            f"--timeout={START_TIMEOUT_S}",
            "start",
        )

    def halt(self) -> None:
        """Stop the server as an operator would (``-m fast``: clients are disconnected), keeping its data."""
        self._run(str(self.bin_dir / "pg_ctl"), f"--pgdata={self.data_dir}", "-m", "fast", "--wait", "stop")

    def stop(self) -> None:
        """Stop the server at once (nothing in it is kept) and delete its directory."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run(
                    str(self.bin_dir / "pg_ctl"), f"--pgdata={self.data_dir}", "-m", "immediate", "stop"
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one SQL statement as the superuser with ``psql``; returns its unaligned output."""
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                f"--host={self.host}",
                f"--port={self.port}",
                f"--username={SUPERUSER}",
                f"--dbname={database}",
                "--no-psqlrc",
                "--tuples-only",
                "--no-align",
                "--set=ON_ERROR_STOP=1",
                f"--command={statement}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql {statement!r} failed: {done.stderr}")
        return done.stdout.strip()

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server, through asyncpg."""
        return f"postgresql+asyncpg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def create_database(self, icu_locale: str | None = None) -> str:
        """A new, empty database, sorting text by ``icu_locale`` if given (else by code point).

        Returns its name. FILE_COPY clones the template's files instead of logging every page: about
        half the time, which counts with one database per test.
        """
        name = f"t_{uuid.uuid4().hex[:16]}"
        if icu_locale is None:
            self.sql(f"CREATE DATABASE {name} STRATEGY = FILE_COPY")
        else:
            self.sql(
                f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'"
            )
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a connection a failed test left open must not keep the database alive.
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
