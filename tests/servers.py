"""Real servers for the tests, on 127.0.0.1 only: a private PostgreSQL cluster and an MLflow tracking server."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The PostgreSQL server binaries (Debian keeps them out of PATH, in /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")  # elsewhere: the real binaries on PATH
    return Path(on_path).parent if on_path else None


class Postgres:
    """initdb + pg_ctl start a throwaway cluster in `root`; trust auth, TCP on 127.0.0.1 only."""

    def __init__(self):
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
        # Its own folder directly under /tmp: as root the server runs as 'postgres', which must be able to
        # reach it (pytest's tmp_path sits below 0700 folders).
        self.root, self.port = Path(tempfile.mkdtemp(prefix="orch-pg-")), free_port()
        self.data = self.root / "data"
        self.user = "orch"

    def _run(self, *cmd: str) -> None:
        # initdb refuses to run as root; run the server as the 'postgres' user when we are root.
        if os.geteuid() == 0:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")

    def start(self) -> "Postgres":
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start"
        )
        return self

    def create_db(self, name: str) -> str:
        import sqlalchemy as sa

        engine = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        engine.dispose()
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` over a store (SQLite, PostgreSQL), on 127.0.0.1, for reading runs back through the REST
    API. serve_artifacts: clients send artifacts to the server, which keeps them under `artifacts` (no disk
    shared with the clients); otherwise clients write them to `artifacts` themselves."""

    def __init__(self, store_uri: str, artifacts: Path, serve_artifacts: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        where = (
            ["--serve-artifacts", "--artifacts-destination", artifacts.as_uri()]
            if serve_artifacts
            else ["--default-artifact-root", artifacts.as_uri()]
        )
        self.cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store_uri,
            *where,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "MlflowServer":
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {self.proc.returncode}") from None
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
