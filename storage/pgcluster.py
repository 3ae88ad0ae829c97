"""A throwaway PostgreSQL cluster for tests and benchmarks: ``initdb`` + ``pg_ctl`` in a
temporary directory, listening only on a Unix socket (no TCP at all), stopped and deleted on exit.

PostgreSQL refuses to run as root, so when we are root the cluster runs as an unprivileged user
(``nobody``); otherwise as ourselves.  Authentication is ``trust`` on that private socket, whose
folder is 0700 and owned by the cluster's user (root still gets in; nobody else does).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


class ClusterUnavailable(RuntimeError):
    """No PostgreSQL binaries, or no way to run them; the message says which."""


def find_bin_dir() -> Path | None:
    env = os.environ.get("KZPROBE_PG_BIN")
    for d in ([env] if env else []) + list(PG_BIN_DIRS):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    return None


def unavailable_reason() -> str | None:
    """Why :func:`throwaway_cluster` cannot work here, or None when it can."""
    if find_bin_dir() is None:
        return "PostgreSQL binaries (initdb, pg_ctl) not found in " + ", ".join(PG_BIN_DIRS)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (3) is not installed: pip install 'kzprobe[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no 'nobody' user to run PostgreSQL as"
    return None


@dataclass
class Cluster:
    socket_dir: Path
    user: str = "kzprobe"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@/{dbname}?host={self.socket_dir}"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.socket_dir), user=self.user, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def throwaway_cluster(*, durable: bool = False, settings: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start a private cluster; ``durable=False`` turns fsync off (tests: speed over crash safety)."""
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    uid: int | None = None
    gid: int | None = None
    if os.geteuid() == 0:
        pw = pwd.getpwnam("nobody")
        uid, gid = pw.pw_uid, pw.pw_gid
    root = Path(tempfile.mkdtemp(prefix="kzprobe-pg-"))
    data, sock, log = root / "data", root / "sock", root / "log"
    sock.mkdir(mode=0o700)
    if uid is not None and gid is not None:
        for p in (root, sock):
            os.chown(p, uid, gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "TZ": "UTC"}

    def pg(*args: str, timeout: float = 60) -> None:
        subprocess.run([str(bin_dir / args[0]), *args[1:]], check=True, cwd=root, env=env, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, user=uid, group=gid,
                       extra_groups=[] if uid is not None else None)

    opts = {"listen_addresses": "''", "unix_socket_directories": f"'{sock}'", "max_connections": "60",
            **({} if durable else {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}),
            **(settings or {})}
    started = False
    try:
        try:
            pg("initdb", "-D", str(data), "-U", "kzprobe", "--auth=trust", "-E", "UTF8", "--no-sync")
            with open(data / "postgresql.conf", "a") as f:
                f.writelines(f"{k} = {v}\n" for k, v in opts.items())
            pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
            started = True
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
            with contextlib.suppress(OSError):
                tail += log.read_text(errors="replace").strip().splitlines()[-1:]
            raise ClusterUnavailable(f"{exc.cmd[0]} failed: {' / '.join(tail)}") from None
        yield Cluster(sock)
    finally:
        if started:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
