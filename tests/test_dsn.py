"""DSNs in both libpq forms: parsing, asyncpg's form, and passwords kept out of every message."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import batchloop as bl
import batchloop.sync as bls
from batchloop import dsn as bldsn
from batchloop.connect import ConnectError, connect

import jobs
import psycopg_jobs
from jobs import TABLES, next_items, process_items

TESTS = Path(__file__).resolve().parent
SECRET = "hunter2xyz"

AGREE = [
    "host=127.0.0.1 dbname=x user=root password=hunter2",
    "host = x  password = 'a b\\'c' options='-c statement_timeout=5s'",
    "dbname=a\\ b port=5433",
    "postgresql://root:hun%40ter@h1:5432,h2:5433/db?sslmode=require&application_name=a%20b",
    "postgresql://root@/db?host=/tmp/x&password=hunter2",
    "postgresql://[::1]:5432/db",
    "postgres://u@h/d?ssl=true",
    "postgresql://h1:5432,h2/db",
    "postgresql:///db",
    "postgresql://",
    "",
]


@pytest.mark.parametrize("text", AGREE)
def test_pure_parser_agrees_with_libpq(text: str) -> None:
    """The fallback for machines without libpq reads DSNs as libpq does."""
    libpq = {k: str(v) for k, v in conninfo_to_dict(text).items()}
    assert bldsn.parse_pure(text) == libpq
    assert bldsn.parse(text) == libpq


@pytest.mark.parametrize(
    "text",
    [
        f"host=x password={SECRET} port=1",
        f"host=x password='{SECRET}'",
        f"postgresql://u:{SECRET}@h/d",
        f"postgresql://u@h/d?password={SECRET}",
        f"postgresql://u@h/d?sslmode=require&password={SECRET}",
        f"postgresql://u:{SECRET}%ZZ@h/d",  # unparseable: libpq would quote the password
        f"host=x password='{SECRET}",  # unterminated
    ],
)
def test_redact_hides_the_password_in_any_form(text: str) -> None:
    assert SECRET not in bldsn.redact(text)
    if "%ZZ" not in text and text.count("'") != 1:  # a parseable DSN: its password is known
        assert SECRET not in bldsn.scrub(f"boom {SECRET}", text)
    try:
        bldsn.for_asyncpg(text)
    except bldsn.DsnError as exc:
        assert SECRET not in str(exc)


def test_scrub_removes_a_known_password() -> None:
    assert bldsn.scrub(f"server said {SECRET}!", f"host=x password={SECRET}") == "server said ***!"


def _key_value(url: str) -> str:
    """The test database's URL as a libpq key=value string."""
    return make_conninfo(**conninfo_to_dict(url))


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["url", "key=value"])
async def test_connect_error_hides_the_password(form: str) -> None:
    text = (
        f"host=127.0.0.1 port=1 dbname=x user=u password={SECRET}"
        if form == "key=value"
        else f"postgresql://u@127.0.0.1:1/x?password={SECRET}"
    )
    with pytest.raises(ConnectError) as info:
        await connect(text, timeout=0.1)
    assert SECRET not in str(info.value)
    assert "password=***" in str(info.value) or ":***@" in str(info.value)
    with pytest.raises(ConnectError) as sync_info:
        bls.connect(text, timeout=1)
    assert SECRET not in str(sync_info.value)


@pytest.mark.anyio
async def test_key_value_dsn_everywhere(dsn: str) -> None:
    """migrate, tick, Host (asyncpg and psycopg drivers) all take a key=value DSN."""
    kv = _key_value(dsn) + " application_name=kvtest connect_timeout=5 keepalives=1"
    assert "://" not in kv
    await bl.migrate(kv)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(TABLES)
        await conn.execute("INSERT INTO items (name, value) VALUES ('kv', 1), ('kv', 2)")
        await bl.ping(conn, "kv", next_items, process_items)
        report = await bl.tick(kv, ["kv"], budget=10.0)
        assert report.drained == ["kv"]
        for driver, module in (("asyncpg", jobs), ("psycopg", psycopg_jobs)):
            await conn.execute("INSERT INTO items (name, value) VALUES ('kv', 3)")
            await bl.ping(conn, "kv", module.next_items, module.process_items)
            async with bl.Host(kv, modules=[module.__name__], driver=driver):  # type: ignore[arg-type]
                for _ in range(400):
                    if not await conn.fetchval("SELECT count(*) FROM items"):
                        break
                    await asyncio.sleep(0.05)
            assert await conn.fetchval("SELECT count(*) FROM items") == 0
    finally:
        await conn.close()


def test_asyncpg_form_keeps_hosts_ports_sockets_and_options() -> None:
    url, kwargs = bldsn.for_asyncpg(
        "host=/run/pg,db.example,::1 port=5432,,6000 dbname='my db' user=me password='p w&' "
        "sslmode=require options='-c search_path=x' connect_timeout=7 keepalives_idle=3"
    )
    assert kwargs == {"timeout": 7.0}
    addrs, stuff = asyncpg.connect_utils._parse_connect_dsn_and_args(  # type: ignore[attr-defined]
        dsn=url,
        host=None,
        port=None,
        user=None,
        password=None,
        passfile=None,
        database=None,
        ssl=None,
        service=None,
        servicefile=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )
    assert addrs == ["/run/pg/.s.PGSQL.5432", ("db.example", 5432), ("::1", 6000)]
    assert stuff.database == "my db" and stuff.user == "me" and stuff.password == "p w&"
    assert stuff.server_settings == {"options": "-c search_path=x"}
    assert stuff.ssl is not None


def _cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHLOOP_DSN", "DATABASE_URL")}
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "batchloop", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTS,
        timeout=90,
    )


def test_cli_with_key_value_dsn(dsn: str) -> None:
    kv = _key_value(dsn)
    assert _cli("--dsn", kv, "migrate").returncode == 0
    with psycopg.connect(dsn) as c:
        c.execute(TABLES)
        c.execute("INSERT INTO items (name, value) VALUES ('kvc', 1)")
        bls.ping(c, "kvc", next_items, process_items)
    tick = _cli("tick", "jobs", "--name", "kvc", BATCHLOOP_DSN=kv)
    assert tick.returncode == 0, tick.stderr
    demo = _cli("--dsn", kv, "demo", "--events", "300")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "processed 300 of 300 inserted OK" in demo.stdout


@pytest.mark.parametrize(
    "bad",
    [
        f"host=127.0.0.1 port=1 dbname=x user=u password={SECRET}",
        f"postgresql://u@127.0.0.1:1/x?password={SECRET}",
        f"postgresql://u:{SECRET}@127.0.0.1:1/x",
        f"postgresql://u:{SECRET}%ZZ@127.0.0.1:1/x",
    ],
)
@pytest.mark.parametrize("command", [["status"], ["tick", "jobs"]])
def test_cli_never_prints_the_password(bad: str, command: list[str]) -> None:
    proc = _cli("--dsn", bad, *command, PGCONNECT_TIMEOUT="1")
    assert proc.returncode == 1, proc
    assert SECRET not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("batchloop: error: ")
