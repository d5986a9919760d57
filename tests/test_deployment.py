"""Deployment hazards: PgBouncer transaction pooling, and a least-privilege application role.

See docs/deployment.md for the guidance these tests back.

PgBouncer tests start a throwaway ``pgbouncer`` (the Debian package; as root it runs as the
``postgres`` OS user) on a free 127.0.0.1 port in front of the test's database. They are skipped
only when no ``pgbouncer`` binary is installed. Role tests create ``bltest_*`` roles and drop them
afterwards; they are skipped when the tests' server user may not create roles.

"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import anyio
import asyncpg
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import batchloop as bl
import batchloop.sync as bls
from batchloop.connect import check_dedicated_session
from batchloop.errors import SessionRequiredError
from batchloop.migrations import code_version

import psycopg_jobs
from helpers import count as _count
from helpers import wait_for
from jobs import KNOBS, Knobs, create_tables, insert_and_ping, knobs

pytestmark = pytest.mark.anyio
HERE = Path(__file__).parent


# ============================================================================================
# A throwaway PgBouncer


def _pgbouncer_binary() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("pgbouncer", path=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as(server_host: str | None) -> str | None:
    """PgBouncer refuses to run as root: as root, run it as the ``postgres`` OS user, or, for a
    server on a unix socket (the embedded server), as the socket directory's owner."""
    if os.geteuid() != 0:
        return None
    if server_host and server_host.startswith("/"):
        return pwd.getpwuid(os.stat(server_host).st_uid).pw_name
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("pgbouncer refuses to run as root and there is no 'postgres' OS user")
    return "postgres"


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


async def _pgbouncer_answers(
    url: str, proc: anyio.abc.Process, log: Path, errors: list[BaseException]
) -> bool:
    if proc.returncode is not None:
        raise RuntimeError(f"pgbouncer exited with {proc.returncode}:\n{_tail(log)}")
    try:
        conn = await asyncpg.connect(url, statement_cache_size=0, timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        errors.append(exc)  # not listening yet, or cannot reach the server (see the log)
        return False
    await conn.close()
    return True


def _write_config(ini: str, *, users: str, owner: str | None) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="bltest-pgbouncer-"))
    (workdir / "pgbouncer.ini").write_text(ini.replace("{dir}", str(workdir)))
    (workdir / "users.txt").write_text(users)
    if owner is not None:
        for path in (workdir, *workdir.iterdir()):
            shutil.chown(path, owner)
    return workdir


BOUNCER_LOGS: dict[str, Path] = {}
"""Log file of each running PgBouncer, by the DSN it serves."""


@contextlib.asynccontextmanager
async def pgbouncer(
    dsn: str, *, pool_mode: str = "transaction", pool_size: int = 5, **settings: str | int
) -> AsyncIterator[str]:
    """Run PgBouncer in front of ``dsn``'s database; yield a DSN (same user) through it."""
    exe = _pgbouncer_binary()
    if exe is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
    params = conninfo_to_dict(dsn)
    dbname = str(params["dbname"])
    user = str(params.get("user") or getpass.getuser())
    server = f"dbname={dbname}"
    for key in ("host", "port"):
        if params.get(key):
            server += f" {key}={params[key]}"
    run_as = _run_as(str(params["host"]) if params.get("host") else None)
    port = _free_port()
    workdir = _write_config(
        f"[databases]\n{dbname} = {server}\n\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = trust\nauth_file = {dir}/users.txt\n"
        f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\n"
        "logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n"
        + "".join(f"{k} = {v}\n" for k, v in settings.items()),
        # auth_type=trust still wants the user listed; a password there (plain) is what
        # PgBouncer uses to log in to the server if the server asks for one.
        users=f'"{user}" "{params.get("password") or ""}"\n',
        owner=run_as,
    )
    log = workdir / "pgbouncer.log"
    cmd = [exe, *(["-u", run_as] if run_as else []), str(workdir / "pgbouncer.ini")]
    proc = await anyio.open_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"postgresql://{quote(user, safe='')}@127.0.0.1:{port}/{quote(dbname, safe='')}"
        errors: list[BaseException] = []
        try:
            await wait_for(lambda: _pgbouncer_answers(url, proc, log, errors), timeout=15)
        except AssertionError as exc:
            raise AssertionError(
                f"pgbouncer did not serve {url}: {errors[-1:]!r}\n{_tail(log)}"
            ) from exc
        BOUNCER_LOGS[url] = log
        yield url
    finally:
        BOUNCER_LOGS.pop(url, None)
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
            await proc.aclose()
        shutil.rmtree(workdir, ignore_errors=True)


async def _behind_a_pooler(conn: Any) -> bool:
    return bool(conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()"))


ADVISORY_LOCKS = """
SELECT count(*) FROM pg_locks
 WHERE locktype = 'advisory'
   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _fresh_knobs(name: str) -> Knobs:
    """The shared callables' knobs for ``name``, reset (they outlive a test in KNOBS)."""
    KNOBS.pop(name, None)
    return knobs(name)


async def _setup(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await create_tables(conn)
    return conn


async def _owner_id(conn: Any, name: str) -> str | None:
    st = await bl.status(conn, name)
    return st.owner.host_id if st and st.owner else None


async def _state(conn: Any, name: str) -> str | None:
    st = await bl.status(conn, name)
    return st.state if st else None


# ============================================================================================
# PgBouncer: what breaks, and how to tell


async def test_transaction_pooling_shares_session_state_between_clients(
    migrated_dsn: str,
) -> None:
    """Why a host cannot run through transaction pooling (PgBouncer's behaviour, not ours)."""
    direct = await asyncpg.connect(migrated_dsn)
    async with pgbouncer(migrated_dsn, pool_size=1) as bouncer:
        a = await asyncpg.connect(bouncer, statement_cache_size=0)
        b = await asyncpg.connect(bouncer, statement_cache_size=0)
        assert await _behind_a_pooler(a)
        # Two clients both "win" one session advisory lock: it is the same server session.
        assert await a.fetchval("SELECT pg_try_advisory_lock(4242)") is True
        assert await b.fetchval("SELECT pg_try_advisory_lock(4242)") is True
        assert await direct.fetchval("SELECT pg_try_advisory_lock(4242)") is False
        # "Unlocking" from b releases a's lock too (session locks are re-entrant, counted).
        assert await b.fetchval("SELECT pg_advisory_unlock(4242)") is True
        assert await b.fetchval("SELECT pg_advisory_unlock(4242)") is True
        assert await direct.fetchval("SELECT pg_try_advisory_lock(4242)") is True
        await direct.execute("SELECT pg_advisory_unlock_all()")
        # LISTEN registers the shared server session; a notification arriving while no client
        # is linked to it is dropped by PgBouncer, so wake-ups are lost.
        heard: list[str] = []
        await a.add_listener("bltest_chan", lambda *args: heard.append(args[-1]))
        await direct.execute("NOTIFY bltest_chan, 'wake'")
        dropped = "got packet 'A' from server when not linked"
        await wait_for(lambda: dropped in BOUNCER_LOGS[bouncer].read_text(), timeout=10)
        await a.fetchval("SELECT 1")
        await b.fetchval("SELECT 1")
        assert heard == []
        await a.close()
        await b.close()
    await direct.close()


async def test_asyncpg_statement_cache_breaks_through_transaction_pooling(
    migrated_dsn: str,
) -> None:
    """asyncpg's default named prepared statements need ``statement_cache_size=0`` here."""
    async with pgbouncer(migrated_dsn, pool_size=2) as bouncer:
        a = await asyncpg.connect(bouncer)
        b = await asyncpg.connect(bouncer)
        await a.fetchval("SELECT $1::int", 1)  # prepared (named) on a's backend, then released
        async with b.transaction():  # b now holds that backend ...
            with pytest.raises(asyncpg.InvalidSQLStatementNameError):
                await a.fetchval("SELECT $1::int", 2)  # ... so a's cached statement is gone
        for conn in (a, b):
            await conn.close()
        c = await asyncpg.connect(bouncer, statement_cache_size=0)  # unnamed statements: fine
        d = await asyncpg.connect(bouncer, statement_cache_size=0)
        await c.fetchval("SELECT $1::int", 1)
        async with d.transaction():
            assert await c.fetchval("SELECT $1::int", 2) == 2
        for conn in (c, d):
            await conn.close()


@pytest.mark.parametrize("statement_cache_size", [0, 100])
@pytest.mark.parametrize(
    ("pool_mode", "settings", "dedicated"),
    [
        ("direct", {}, True),
        ("session", {}, True),
        ("transaction", {}, False),
        ("transaction", {"server_round_robin": 1}, False),
        ("statement", {}, False),
    ],
)
async def test_check_dedicated_session(
    migrated_dsn: str,
    pool_mode: str,
    settings: dict[str, int],
    dedicated: bool,
    statement_cache_size: int,
) -> None:
    """The proposed detection: no false alarm on direct or session-pooled connections, and a
    clear SessionRequiredError through transaction or statement pooling, even with several
    idle server connections in the pool."""
    kwargs = {"statement_cache_size": statement_cache_size}
    async with contextlib.AsyncExitStack() as stack:
        if pool_mode == "direct":
            dsn = migrated_dsn
        else:
            dsn = await stack.enter_async_context(
                pgbouncer(migrated_dsn, pool_mode=pool_mode, pool_size=4, **settings)
            )
            if pool_mode != "statement":
                await _warm_servers(dsn, 3)
        conn = await asyncpg.connect(dsn, **kwargs)
        stack.push_async_callback(conn.close)
        if dedicated:
            await check_dedicated_session(conn, dsn, **kwargs)
        else:
            with pytest.raises(SessionRequiredError, match=r"control_dsn=") as info:
                await check_dedicated_session(conn, dsn, **kwargs)
            assert "pool_mode=transaction" in str(info.value)


async def _warm_servers(dsn: str, n: int) -> None:
    """Make the pooler open ``n`` server connections, all idle afterwards."""
    conns = [await asyncpg.connect(dsn, statement_cache_size=0) for _ in range(n)]
    async with contextlib.AsyncExitStack() as stack:
        for c in conns:
            stack.push_async_callback(c.close)
            await stack.enter_async_context(c.transaction())
            await c.fetchval("SELECT 1")


async def test_host_refuses_transaction_pooling(migrated_dsn: str) -> None:
    async with pgbouncer(migrated_dsn) as bouncer:
        for kwargs in ({}, {"statement_cache_size": 0}):
            with pytest.raises(bl.BatchloopError, match=r"control_dsn=") as info:
                async with bl.Host(bouncer, modules=["jobs"], connect_kwargs=kwargs):
                    pass
            assert type(info.value).__name__ == "SessionRequiredError"
            assert "pool_mode=transaction" in str(info.value)


async def test_tick_refuses_transaction_pooling(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    await insert_and_ping(conn, "tk", 3)
    async with pgbouncer(migrated_dsn) as bouncer:
        with pytest.raises(bl.BatchloopError, match=r"pool_mode=transaction"):
            await bl.tick(bouncer, budget=5.0)
    assert await _count(conn, "SELECT count(*) FROM items") == 3  # nothing ran
    await conn.close()


KEEPALIVE_PARAMETERS = "tcp_keepalives_idle, tcp_keepalives_interval, tcp_keepalives_count"


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"ignore_startup_parameters": KEEPALIVE_PARAMETERS}, id="ignore-keepalives"),
        pytest.param({}, id="stock-config"),
    ],
)
async def test_host_through_session_pooling_works(
    migrated_dsn: str, settings: dict[str, str]
) -> None:
    """Session pooling keeps a server connection per client: hosts may use it (and the
    proposed check must not refuse it: see test_check_dedicated_session). Today the host's
    tcp_keepalives_* startup parameters make a stock PgBouncer refuse every connection
    ("unsupported startup parameter"), unless it is told to ignore them."""
    conn = await _setup(migrated_dsn)
    async with pgbouncer(migrated_dsn, pool_mode="session", pool_size=20, **settings) as bouncer:
        async with bl.Host(bouncer, modules=["jobs"]) as host:
            async with host.pool.acquire() as c:
                assert await _behind_a_pooler(c)
            k = _fresh_knobs("sess")
            k.gate = asyncio.Event()
            await insert_and_ping(conn, "sess", 120)
            await k.entered.wait()
            assert await _owner_id(conn, "sess") == host.host_id
            k.gate.set()
            await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=120)
            await wait_for(lambda: _state(conn, "sess"), expect="idle")
            assert await insert_and_ping(conn, "sess", 5) == "woken"
            await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=125)
        # PgBouncer resets a session-pooled server connection (DISCARD ALL) when its client
        # leaves: the host's session locks do not outlive it.
        await wait_for(lambda: _count(conn, ADVISORY_LOCKS), expect=0)
    await conn.close()


async def test_ping_stop_start_status_through_transaction_pooling(migrated_dsn: str) -> None:
    """Application connections may go through transaction pooling: ping, stop, start, status
    and list_workers are transaction-scoped (ping's shared advisory lock is a transaction
    lock), with asyncpg's statement_cache_size=0 or psycopg's prepare_threshold=None."""
    name = "pgb"
    conn = await _setup(migrated_dsn)
    k = _fresh_knobs(name)
    k.limit = 7
    async with (
        pgbouncer(migrated_dsn, pool_size=3) as bouncer,
        bl.Host(migrated_dsn, modules=["jobs"]) as host,  # the host itself connects directly
    ):
        single = await asyncpg.connect(bouncer, statement_cache_size=0)
        pool = await asyncpg.create_pool(bouncer, statement_cache_size=0, min_size=2, max_size=4)
        pg = await psycopg.AsyncConnection.connect(bouncer, autocommit=True, prepare_threshold=None)
        assert await _behind_a_pooler(single)
        assert pg.info.backend_pid != await _fetchval_pg(pg, "SELECT pg_backend_pid()")

        async def with_single(i: int) -> None:
            await insert_and_ping(single, name, 1)

        async def with_pool(i: int) -> None:
            async with pool.acquire() as c:
                await insert_and_ping(c, name, 2)

        async def with_psycopg(i: int) -> None:
            await _psycopg_insert_and_ping(pg, name, 3)

        async with anyio.create_task_group() as tg:
            for produce in (with_single, with_pool, with_pool, with_psycopg):
                tg.start_soon(_repeat, produce, 25)
        total = 25 * (1 + 2 + 2 + 3)
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=total)
        assert await _count(conn, "SELECT count(DISTINCT item_id) FROM done") == total

        # idle, then woken by a ping through the pooler (its NOTIFY reaches the host)
        await wait_for(lambda: _state(single, name), expect="idle")
        assert await _psycopg_insert_and_ping(pg, name, 1) == "woken"
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=total + 1)

        # owner is visible through the pooler while a batch is held open
        k.gate = asyncio.Event()
        k.entered.clear()
        await insert_and_ping(single, name, 1)
        await k.entered.wait()
        st = await bl.status(pool, name)
        assert st is not None and st.state == "running"
        assert st.owner is not None and st.owner.host_id == host.host_id
        k.gate.set()
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=total + 2)

        # stop, work arrives while stopped, start: it is processed
        assert await bl.stop(single, name) is True
        assert await _state(pg, name) == "stopped"
        assert await insert_and_ping(single, name, 4) == "stopped"
        assert await bl.start(pool, name) is True
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=total + 6)
        assert [w.name for w in await bl.list_workers(pg)] == [name]
        st = await bl.status(single, name)
        assert st is not None and st.consecutive_failures == 0 and st.last_error is None

        await single.close()
        await pool.close()
        await pg.close()
    # host gone: nothing is left locked, neither directly nor on the pooler's server sessions
    assert await _count(conn, ADVISORY_LOCKS) == 0
    await conn.close()


async def _repeat(fn: Callable[[int], Any], n: int) -> None:
    for i in range(n):
        await fn(i)


async def _fetchval_pg(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
    cur = await conn.execute(query)
    row = await cur.fetchone()
    return row[0] if row else None


async def _psycopg_insert_and_ping(conn: psycopg.AsyncConnection[Any], name: str, n: int) -> str:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO items (name, value) SELECT %s, g FROM generate_series(1, %s) g",
            (name, n),
        )
        from jobs import next_items, process_items

        return await bl.ping(conn, name, next_items, process_items)


async def test_host_with_direct_control_dsn_and_pool_through_pgbouncer(migrated_dsn: str) -> None:
    """Proposed: Host(pooled_dsn, control_dsn=direct_dsn). Locks and LISTEN live on the direct
    control connection; the loops' transactions use the pool through the pooler, which gets
    statement_cache_size=0 by default. Several names at once, many batches: no prepared
    statement errors, exactly-once, owner visible, and no lock left behind."""
    conn = await _setup(migrated_dsn)
    names = ["cd1", "cd2", "cd3"]
    for n in names:
        _fresh_knobs(n).limit = 10
    async with pgbouncer(migrated_dsn, pool_size=2) as bouncer:
        async with bl.Host(  # type: ignore[call-arg]  # control_dsn: the proposed parameter
            bouncer, control_dsn=migrated_dsn, modules=["jobs"], pool_max_size=4
        ) as host:
            async with host.pool.acquire() as c:
                assert await _behind_a_pooler(c)
            k = knobs("cd1")
            k.gate = asyncio.Event()
            for n in names:
                await insert_and_ping(conn, n, 200)
            await k.entered.wait()
            assert await _owner_id(conn, "cd1") == host.host_id
            k.gate.set()
            await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=600)
            assert await _count(conn, "SELECT count(DISTINCT item_id) FROM done") == 600
            for n in names:
                st = await bl.status(conn, n)
                assert st is not None and st.batches == 20
                assert st.consecutive_failures == 0 and st.last_error is None, st.last_error
            await wait_for(lambda: _state(conn, "cd2"), expect="idle")
            assert await insert_and_ping(conn, "cd2", 1) == "woken"
            await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=601)
        assert await _count(conn, ADVISORY_LOCKS) == 0
    await conn.close()


async def test_psycopg_host_with_its_pool_through_pgbouncer(migrated_dsn: str) -> None:
    """The same with driver="psycopg": its pool connections through the pooler get
    prepare_threshold=None (psycopg would otherwise prepare a statement after its fifth run, on
    whichever server connection it had then). 20 batches per name, so every statement runs far
    more than five times."""
    conn = await _setup(migrated_dsn)
    producer = await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True)
    names = ["pcd1", "pcd2", "pcd3"]
    for n in names:
        psycopg_jobs.KNOBS.pop(n, None)
        psycopg_jobs.knobs(n).limit = 10
    async with pgbouncer(migrated_dsn, pool_size=2) as bouncer:
        async with bl.Host(
            bouncer,
            control_dsn=migrated_dsn,
            modules=["psycopg_jobs"],
            pool_max_size=4,
            driver="psycopg",
        ):
            for n in names:
                await psycopg_jobs.insert_and_ping(producer, n, 200)
            await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=600)
            assert await _count(conn, "SELECT count(DISTINCT item_id) FROM done") == 600
            for n in names:
                st = await wait_for(
                    lambda n=n: bl.status(conn, n), expect=lambda s: s.state == "idle"
                )
                assert st.batches == 20
                assert st.consecutive_failures == 0 and st.last_error is None, st.last_error
        assert await _count(conn, ADVISORY_LOCKS) == 0
    await producer.close()
    await conn.close()


# ============================================================================================
# Least-privilege application role

# What an application role needs once the owner has run `batchloop migrate` (the same SQL is in
# docs/deployment.md). Re-run after every migrate that adds tables or functions.
APP_GRANTS = """
GRANT CONNECT ON DATABASE {database} TO {role};
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};
"""

# Hardening applied first, so the tests do not pass thanks to PUBLIC's default privileges.
HARDEN = """
REVOKE ALL ON DATABASE {database} FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} FROM PUBLIC;
"""

# The tests' own tables (an application's tables, not batchloop's).
JOB_GRANTS = """
GRANT SELECT, INSERT, UPDATE, DELETE ON items, done, calls TO {role};
GRANT USAGE ON SEQUENCE items_id_seq TO {role};
"""


def _render(template: str, *, role: str, database: str, schema: str = "batchloop") -> sql.SQL:
    ids = {
        "role": sql.Identifier(role).as_string(None),
        "database": sql.Identifier(database).as_string(None),
        "schema": sql.Identifier(schema).as_string(None),
    }
    return sql.SQL(template.format(**ids))


def _database(dsn: str) -> str:
    return unquote(urlsplit(dsn).path.lstrip("/"))


def _as_user(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    hostport = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{hostport}"
    query = f"?{parts.query}" if parts.query else ""
    return f"postgresql://{netloc}{parts.path}{query}"


class Roles:
    """Creates login roles with nothing granted; drops them (and their grants) afterwards."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.database = _database(dsn)
        self.created: list[str] = []

    def create(self, kind: str) -> tuple[str, str]:
        role = f"bltest_{kind}_{uuid.uuid4().hex[:10]}"
        password = uuid.uuid4().hex
        with psycopg.connect(self.dsn, autocommit=True) as c:
            c.execute(
                sql.SQL(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                    "NOBYPASSRLS PASSWORD {}"
                ).format(sql.Identifier(role), sql.Literal(password))
            )
        self.created.append(role)
        return role, _as_user(self.dsn, role, password)

    def run(self, template: str, role: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            c.execute(_render(template, role=role, database=self.database))

    def grant_app(self, role: str) -> None:
        self.run(HARDEN + APP_GRANTS + JOB_GRANTS, role)

    def drop_all(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            for role in self.created:
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (role,),
                )
                c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(migrated_dsn: str) -> Iterator[Roles]:
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    if not (row and row[0]):
        pytest.skip("the test server's user may not create roles")
    r = Roles(migrated_dsn)
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        c.execute(create_tables_sql())
    try:
        yield r
    finally:
        r.drop_all()


def create_tables_sql() -> str:
    from jobs import TABLES

    return TABLES


OWNS_OR_INHERITS = """
SELECT r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls
       OR EXISTS (SELECT FROM pg_class WHERE relowner = r.oid)
       OR EXISTS (SELECT FROM pg_namespace WHERE nspowner = r.oid)
       OR EXISTS (SELECT FROM pg_proc WHERE proowner = r.oid)
       OR EXISTS (SELECT FROM pg_database WHERE datdba = r.oid)
       OR EXISTS (SELECT FROM pg_auth_members WHERE member = r.oid)
  FROM pg_roles r WHERE r.rolname = $1
"""


async def test_least_privilege_role_runs_host_ping_stop_start_status_tick(
    migrated_dsn: str, roles: Roles
) -> None:
    role, app_dsn = roles.create("app")
    roles.grant_app(role)
    admin = await asyncpg.connect(migrated_dsn)
    assert await admin.fetchval(OWNS_OR_INHERITS, role) is False
    app = await asyncpg.connect(app_dsn)
    assert await app.fetchval("SELECT current_user") == role

    # tick as the app role (no host yet)
    assert await insert_and_ping(app, "lp", 5) == "created"
    report = await bl.tick(app_dsn, budget=10.0)
    assert report.drained == ["lp"] and report.failed == []
    assert await _count(app, "SELECT count(*) FROM done") == 5

    k = _fresh_knobs("lp")
    async with bl.Host(app_dsn, modules=["jobs"]) as host:
        assert await insert_and_ping(app, "lp", 50) == "woken"
        await wait_for(lambda: _count(app, "SELECT count(*) FROM done"), expect=55)
        # owner visible to the app role (pg_locks needs no extra privilege)
        k.gate = asyncio.Event()
        k.entered.clear()
        await insert_and_ping(app, "lp", 1)
        await k.entered.wait()
        assert await _owner_id(app, "lp") == host.host_id
        k.gate.set()
        await wait_for(lambda: _count(app, "SELECT count(*) FROM done"), expect=56)
        assert await bl.stop(app, "lp") is True
        assert await _state(app, "lp") == "stopped"
        await insert_and_ping(app, "lp", 2)
        assert await bl.start(app, "lp") is True
        await wait_for(lambda: _count(app, "SELECT count(*) FROM done"), expect=58)
        workers = await bl.list_workers(app)
        assert [(w.name, w.consecutive_failures, w.last_error) for w in workers] == [
            ("lp", 0, None)
        ]
    await app.close()
    await admin.close()


async def test_role_without_the_grants_is_refused(migrated_dsn: str, roles: Roles) -> None:
    """The grants above are what makes the role work (PUBLIC's defaults are revoked)."""
    role, app_dsn = roles.create("bare")
    roles.run(HARDEN + "GRANT CONNECT ON DATABASE {database} TO {role};", role)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for schema"):
        async with bl.Host(app_dsn, modules=["jobs"]):
            pass
    roles.run("GRANT USAGE ON SCHEMA {schema} TO {role};", role)
    app = await asyncpg.connect(app_dsn)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
        await bl.status(app, "x")
    await app.close()


async def test_migrate_as_app_role_is_a_no_op_when_up_to_date(
    migrated_dsn: str, roles: Roles
) -> None:
    """Apps that call `await bl.migrate(dsn)` at start-up (as README shows) should keep
    working under a role that may not create anything, once the owner has migrated."""
    role, app_dsn = roles.create("app")
    roles.grant_app(role)
    assert await bl.migrate(app_dsn) == []


def _cli_migrate(dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchloop", "--dsn", dsn, "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_app_role_runs_every_migrate_and_sees_a_newer_schema_refused(
    migrated_dsn: str, roles: Roles
) -> None:
    """``batchloop.sync.migrate`` and ``batchloop migrate`` are read-only no-ops for the role
    too; on a schema a newer release migrated, each raises SchemaTooNewError (not a
    permission error from a CREATE the role may not run)."""
    role, app_dsn = roles.create("app")
    roles.grant_app(role)
    assert bls.migrate(app_dsn) == []
    with psycopg.connect(app_dsn) as c:  # the app's own connection, inside its transaction
        assert bls.migrate(c) == []
    proc = _cli_migrate(app_dsn)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc
    async with await psycopg.AsyncConnection.connect(app_dsn) as ac:
        assert await bl.migrate(ac) == []

    newer = code_version() + 1
    with psycopg.connect(migrated_dsn, autocommit=True) as c:  # a newer release, as the owner
        c.execute(f"INSERT INTO batchloop.schema_migrations VALUES ({newer}, 'future')")
    refused = f"version {newer}, newer than this code"
    with pytest.raises(bl.SchemaTooNewError, match=refused):
        bls.migrate(app_dsn)
    with pytest.raises(bl.SchemaTooNewError, match=refused):
        await bl.migrate(app_dsn)
    proc = _cli_migrate(app_dsn)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc
    assert refused in proc.stderr and "permission denied" not in proc.stderr


# ------------------------------------------------------------------ frozen owner takeover

LAG = 2.0


def _spawn_host(dsn: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "run_host.py"), dsn],
        cwd=HERE,
        env={
            **os.environ,
            "PYTHONPATH": str(HERE),
            "JOBS_LIMIT": "1",
            "JOBS_SLEEP": "0.02",
            "JOBS_NAMES": "f",
        },
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"host process failed to start: {line!r}")
    return proc, line.split()[1]


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(10)


@contextlib.asynccontextmanager
async def _frozen_owner(owner_dsn: str, producer: asyncpg.Connection) -> AsyncIterator[str]:
    """A host process (as ``owner_dsn``'s role) that owns "f" mid-drain, then SIGSTOPped."""
    _fresh_knobs("f")  # this process's knobs, for the host that takes over
    proc, host_id = _spawn_host(owner_dsn)
    try:
        await insert_and_ping(producer, "f", 2000, config=bl.Config(monitor_lag=LAG))
        await wait_for(lambda: _owner_id(producer, "f"), expect=host_id)
        await wait_for(lambda: _count(producer, "SELECT count(*) FROM done"), expect=bool)
        proc.send_signal(signal.SIGSTOP)
        yield host_id
    finally:
        _end(proc)


async def _backends_of(conn: Any, host_id: str) -> int:
    return await _count(
        conn,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
        f"batchloop/{host_id}",
    )


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


@pytest.mark.slow
async def test_frozen_owner_of_the_same_role_is_taken_over(
    migrated_dsn: str, roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batchloop")
    role, app_dsn = roles.create("app")
    roles.grant_app(role)
    app = await asyncpg.connect(app_dsn)
    async with _frozen_owner(app_dsn, app) as frozen:
        old_gen = await app.fetchval("SELECT max(generation) FROM done")
        async with bl.Host(app_dsn, modules=["jobs"]) as taker:
            await wait_for(lambda: _owner_id(app, "f"), expect=taker.host_id, timeout=LAG + 8)
            assert await _backends_of(app, frozen) == 0
            assert _records(caplog, f"host {frozen} stopped heartbeating; terminated its")
            await wait_for(
                lambda: app.fetchval("SELECT max(generation) FROM done"),
                expect=lambda g: g > old_gen,
            )
    await app.close()


async def _wait_failed_takeover(
    app: asyncpg.Connection, frozen: str, caplog: pytest.LogCaptureFixture
) -> list[logging.LogRecord]:
    failed = await wait_for(lambda: _records(caplog, f"frozen host {frozen}"), timeout=LAG + 8)
    # The frozen owner keeps the name: its backends are alive and still hold the lock.
    assert await _owner_id(app, "f") == frozen
    assert await _backends_of(app, frozen) > 0
    return failed


@pytest.mark.slow
async def test_frozen_owner_of_another_role_needs_pg_signal_backend(
    migrated_dsn: str, roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    """pg_terminate_backend on another role's backend raises 42501 without pg_signal_backend
    (PostgreSQL 15: "must be a member of the role whose process is being terminated or member
    of pg_signal_backend"); the host logs it at ERROR on every monitor tick and the name stays
    with the frozen owner. Granting pg_signal_backend lets the next tick take over."""
    caplog.set_level(logging.INFO, logger="batchloop")
    other, other_dsn = roles.create("other")
    roles.grant_app(other)
    role, app_dsn = roles.create("app")
    roles.grant_app(role)
    app = await asyncpg.connect(app_dsn)
    async with (
        _frozen_owner(other_dsn, app) as frozen,
        bl.Host(app_dsn, modules=["jobs"]) as taker,
    ):
        failed = await _wait_failed_takeover(app, frozen, caplog)
        assert failed[0].levelno == logging.ERROR
        assert "pg_signal_backend" in failed[0].getMessage()
        roles.run("GRANT pg_signal_backend TO {role};", role)
        await wait_for(lambda: _owner_id(app, "f"), expect=taker.host_id, timeout=LAG + 8)
        assert await _backends_of(app, frozen) == 0
        print(
            f"{len(_records(caplog, f'frozen host {frozen}'))} failed "
            "takeover attempts logged before the grant"
        )
    await app.close()


@pytest.mark.slow
async def test_failed_takeover_is_logged_once_with_the_fix(
    migrated_dsn: str, roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batchloop")
    other, other_dsn = roles.create("other")
    roles.grant_app(other)
    role, app_dsn = roles.create("app")
    roles.grant_app(role)
    app = await asyncpg.connect(app_dsn)
    async with (
        _frozen_owner(other_dsn, app) as frozen,
        bl.Host(app_dsn, modules=["jobs"]) as taker,
    ):
        await wait_for(lambda: _records(caplog, f"frozen host {frozen}"), timeout=LAG + 8)
        # let the taker's monitor run several more ticks (its heartbeat advances twice)
        beat = "SELECT heartbeat_at FROM batchloop.hosts WHERE host_id = $1"
        for _ in range(2):
            seen = await app.fetchval(beat, taker.host_id)
            await wait_for(
                lambda: app.fetchval(beat, taker.host_id),
                expect=lambda t, seen=seen: t > seen,
            )
        records = _records(caplog, f"frozen host {frozen}")
        assert len(records) == 1, [r.getMessage() for r in records]
        message = records[0].getMessage()
        assert f"GRANT pg_signal_backend TO {role}" in message
        assert other in message  # the frozen host's role
    await app.close()
