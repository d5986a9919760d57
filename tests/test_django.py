"""Django with batchloop on a real database: ``batchloop.sync.ping(connection.connection, ...)``
inside ``transaction.atomic()`` on psycopg 3 (commit and rollback), and the ``batchloop_run``
management command of ``batchloop.django`` as a real process, SIGTERMed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

django = pytest.importorskip("django")

import batchloop.sync as bls  # noqa: E402

from jobs import TABLES, next_items, process_items  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def django_db(migrated_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Django configured by tests/django_settings.py, its default database pointed at this
    test's fresh database (settings load once per process; the connection is reopened)."""
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "django_settings")
    monkeypatch.setenv("BATCHLOOP_TEST_DJANGO_DSN", migrated_dsn)
    import django_settings
    from django.db import connections

    django.setup()
    conn = connections["default"]
    conn.close()
    conn.settings_dict.update(django_settings.database(migrated_dsn))
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        c.execute(TABLES)
    try:
        yield conn
    finally:
        conn.close()


def _outside(dsn: str, name: str) -> tuple[int, Any]:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM items WHERE name = %s", (name,)).fetchone()
        assert row is not None
        return int(row[0]), bls.status(c, name)


def _insert_and_ping(name: str) -> str:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("INSERT INTO items (name, value) VALUES (%s, 1)", [name])
    return bls.ping(connection.connection, name, next_items, process_items)


def test_the_django_connection_is_psycopg_3(django_db: Any) -> None:
    from django.db import transaction

    with transaction.atomic():
        assert isinstance(django_db.connection, psycopg.Connection)


def test_ping_in_atomic_commits_with_the_transaction(django_db: Any, migrated_dsn: str) -> None:
    from django.db import transaction

    with transaction.atomic():
        assert _insert_and_ping("dj") == "created"
        assert _outside(migrated_dsn, "dj") == (0, None)  # not before the commit
        with transaction.atomic():  # a savepoint inside: the ping still counts
            assert _insert_and_ping("dj") == "unchanged"
    items, st = _outside(migrated_dsn, "dj")
    assert items == 2 and st is not None and st.worker == "jobs:process_items"


def test_ping_in_atomic_rolls_back_with_the_transaction(django_db: Any, migrated_dsn: str) -> None:
    from django.db import transaction

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        assert _insert_and_ping("gone") == "created"
        raise Boom
    assert _outside(migrated_dsn, "gone") == (0, None)
    # An inner atomic block rolled back takes its ping with it; the outer one commits.
    with transaction.atomic():
        with pytest.raises(Boom), transaction.atomic():
            _insert_and_ping("inner")
            raise Boom
        _insert_and_ping("outer")
    assert _outside(migrated_dsn, "inner") == (0, None)
    assert _outside(migrated_dsn, "outer")[0] == 1


def test_dsn_from_settings(django_db: Any, migrated_dsn: str) -> None:
    from batchloop.django import dsn_from_settings

    with psycopg.connect(dsn_from_settings()) as c:
        row = c.execute("SELECT current_database()").fetchone()
    assert row is not None and row[0] == django_db.settings_dict["NAME"]
    with pytest.raises(ValueError, match="no database 'other'"):
        dsn_from_settings("other")


# ------------------------------------------------------------------ manage.py batchloop_run


def _command(dsn: str, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "django_settings",
        "BATCHLOOP_TEST_DJANGO_DSN": dsn,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("BATCHLOOP_DSN", "DATABASE_URL"):  # the DSN must come from Django's settings
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, "-m", "django", "batchloop_run", *args],
        env=env,
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.anyio
async def test_batchloop_run_hosts_until_sigterm(migrated_dsn: str) -> None:
    import asyncpg

    import batchloop as bl

    from helpers import count, wait_for
    from jobs import insert_and_ping

    conn = await asyncpg.connect(migrated_dsn)
    await conn.execute(TABLES)
    proc = _command(migrated_dsn)  # modules from settings.BATCHLOOP_MODULES
    try:
        await wait_for(lambda: _hosts_alive(conn), timeout=30, message="the command's host")
        await insert_and_ping(conn, "cmd", 30)
        await wait_for(
            lambda: count(conn, "SELECT count(*) FROM done WHERE name = 'cmd'"), expect=30
        )
        # the only host, so the one that processed them, is the command's
        assert [h.pid for h in await bl.list_hosts(conn) if h.alive] == [proc.pid]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "running jobs" in out and out.rstrip().endswith("stopped")
    st = await bl.status(conn, "cmd")
    assert st is not None and st.owner is None
    assert await _hosts_alive(conn) == 0
    await conn.close()


async def _hosts_alive(conn: Any) -> int:
    import batchloop as bl

    return sum(h.alive for h in await bl.list_hosts(conn))


def test_batchloop_run_errors_are_one_line(migrated_dsn: str) -> None:
    parts = urlsplit(migrated_dsn)
    hostport = parts.netloc.rpartition("@")[2]
    bad = parts._replace(netloc=f"nobody:s3cret@{hostport}").geturl()
    proc = _command(bad, "jobs", "--startup-timeout", "2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "s3cret" not in out + err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    proc = _command(migrated_dsn, "no_such_module_xyz")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "no_such_module_xyz" in err and "Traceback" not in err
