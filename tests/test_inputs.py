"""Bad or hostile input (issue 8): refused before any SQL with a clear error, or stored and
shown safely; on real databases, with the CLI run as a subprocess where it is concerned."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import input_jobs
import psycopg
import pydantic
import pytest
from input_jobs import query, worker

import batchloop as bl
import batchloop.sync as bls
from batchloop import sql
from batchloop.cli import format_status_table
from batchloop.display import printable
from batchloop.errors import BatchloopError
from batchloop.models import MAX_SECONDS, Config, Owner, WorkerStatus

pytestmark = pytest.mark.anyio

NUL_NAME = "bad\x00name"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchloop", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _ping(conn: Any, name: str, config: Config | None = None) -> str:
    return await bl.ping(conn, name, query, worker, config=config)


# ------------------------------------------------------------- 2: tick in an open transaction


async def test_tick_refuses_a_connection_inside_a_transaction(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    other = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute("CREATE TABLE mine (v int)")
        await _ping(conn, "due")  # a due name: tick would run (and commit) an iteration
        tr = conn.transaction()
        await tr.start()
        await conn.execute("INSERT INTO mine VALUES (1)")
        with pytest.raises(BatchloopError, match="outside any transaction"):
            await bl.tick(conn)
        with pytest.raises(BatchloopError, match="outside any transaction"):
            await bl.tick(conn, ["due"])
        assert conn.is_in_transaction()  # still the caller's, still open
        assert await other.fetchval("SELECT count(*) FROM mine") == 0
        await tr.rollback()
        assert await other.fetchval("SELECT count(*) FROM mine") == 0
        st = await bl.status(other, "due")
        assert st is not None and st.batches == 0 and st.state == "running"
        # outside a transaction the same connection works
        report = await bl.tick(conn, ["due"])
        assert report.drained == ["due"] and report.batches == 1
    finally:
        await conn.close()
        await other.close()


# ------------------------------------------------------------- 3: failures with any text


async def test_a_failure_with_nul_or_surrogate_text_is_recorded_tick(migrated_dsn: str) -> None:
    name = "nul-asyncpg"
    input_jobs.MODES[name] = "fail"
    input_jobs.ERRORS[name] = "bad\x00byte and \udc80 here"
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await _ping(conn, name)
        report = await bl.tick(conn, [name])
        assert [f.name for f in report.failed] == [name]
        st = await bl.status(conn, name)
        assert st is not None and st.consecutive_failures == 1
        assert st.last_error == "RuntimeError: bad\\x00byte and \\udc80 here"
    finally:
        await conn.close()


# ------------------------------------------------------------- 5: a corrupted config row


BROKEN_CONFIGS = [
    ('{"debounce": "abc"}', "debounce"),
    ('{"monitor_lag": -5}', "monitor_lag"),
    ("[1, 2]", "not a JSON object"),
    ("null", "not a JSON object"),
    ('"text"', "not a JSON object"),
]


@pytest.mark.parametrize(("stored", "needle"), BROKEN_CONFIGS)
async def test_a_broken_config_row_does_not_hide_the_others(
    migrated_dsn: str, stored: str, needle: str
) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        for name in ("a", "b", "c"):
            await _ping(conn, name, Config(debounce=1.0))
        await conn.execute(
            "UPDATE batchloop.workers SET config = $1::jsonb WHERE name = 'b'", stored
        )
        listed = await bl.list_workers(conn)
        assert [w.name for w in listed] == ["a", "b", "c"]
        a, b, c = listed
        assert a.config_error is None and a.config == Config(debounce=1.0) == c.config
        assert b.config_error is not None and needle in b.config_error
        assert b.config == Config()
        one = await bl.status(conn, "b")
        assert one is not None and one.config_error == b.config_error
    finally:
        await conn.close()
    with psycopg.connect(migrated_dsn, autocommit=True) as sconn:
        assert [w.config_error is None for w in bls.list_workers(sconn)] == [True, False, True]
    table = _cli("--dsn", migrated_dsn, "status")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert set(rows) == {"a", "b", "c"}
    assert "config invalid" in rows["b"] and "config invalid" not in rows["a"]
    listed_json = json.loads(_cli("--dsn", migrated_dsn, "status", "--json").stdout)
    assert [w["config_error"] is None for w in listed_json] == [True, False, True]
    one_json = _cli("--dsn", migrated_dsn, "status", "b", "--json")
    assert one_json.returncode == 0, one_json.stderr
    assert needle in json.loads(one_json.stdout)["config_error"]


@pytest.mark.parametrize("stored", ['{"monitor_lag": "abc"}', '{"monitor_lag": 1e400}', "[1]"])
async def test_a_broken_config_row_does_not_stop_the_monitor_query(
    migrated_dsn: str, stored: str
) -> None:
    """The monitor's query (``orphans``, which tick uses too) reads every name's monitor_lag;
    a held name whose owner is a live host makes it look at the broken one's."""
    conn = await asyncpg.connect(migrated_dsn)
    holder = await asyncpg.connect(migrated_dsn)
    try:
        for name in ("held", "free"):
            await _ping(conn, name)
        await conn.execute(
            "INSERT INTO batchloop.hosts (host_id, hostname, pid) VALUES ('h1', 'elsewhere', 1)"
        )
        await conn.execute(
            "UPDATE batchloop.worker_state SET owner_host = 'h1' WHERE name = 'held'"
        )
        await conn.execute(
            "UPDATE batchloop.workers SET config = $1::jsonb WHERE name = 'held'", stored
        )
        await holder.execute(
            "SELECT pg_advisory_lock(lock_key) FROM batchloop.workers WHERE name = 'held'"
        )
        report = await bl.tick(conn)
        assert report.checked == ["free"] and report.drained == ["free"]
    finally:
        await conn.close()
        await holder.close()


@pytest.mark.parametrize(
    "config",
    [
        Config.model_construct(debounce=-1.0),
        Config.model_construct(debounce=math.inf),
        Config.model_construct(monitor_lag="soon"),
        Config.model_construct(iteration_timeout=0.0),
    ],
)
async def test_ping_never_stores_a_config_that_would_not_validate(
    migrated_dsn: str, config: Config
) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        with pytest.raises(pydantic.ValidationError):
            await _ping(conn, "new", config)
        assert await bl.status(conn, "new") is None  # nothing created
        await _ping(conn, "old", Config(debounce=2.0))
        with pytest.raises(pydantic.ValidationError):
            await _ping(conn, "old", config)
        st = await bl.status(conn, "old")
        assert st is not None and st.config == Config(debounce=2.0) and st.config_error is None
    finally:
        await conn.close()
    with psycopg.connect(migrated_dsn) as sconn, pytest.raises(pydantic.ValidationError):
        bls.ping(sconn, "sync", query, worker, config=config)


# ------------------------------------------------------------- 6: no float in SQL text


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, MAX_SECONDS * 2])
def test_idle_and_debounce_refuse_non_finite_or_huge_values(value: float) -> None:
    with pytest.raises(ValueError, match=r"Idle\.timeout"):
        bl.Idle(timeout=value)
    with pytest.raises(ValueError, match=r"Idle\.cooldown"):
        bl.Idle(cooldown=value)
    with pytest.raises(ValueError, match=r"Idle\.poll_interval"):
        bl.Idle(poll_interval=value)
    with pytest.raises(ValueError, match=r"Debounce\.seconds"):
        bl.Debounce(value)


def test_idle_and_debounce_refuse_what_is_not_a_number() -> None:
    with pytest.raises(TypeError, match=r"Idle\.timeout"):
        bl.Idle(timeout="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Debounce\.seconds"):
        bl.Debounce(None)  # type: ignore[arg-type]
    assert bl.Debounce(5).seconds == 5 and bl.Idle(timeout=MAX_SECONDS).timeout == MAX_SECONDS


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_sql_literal_never_inlines_a_non_finite_float(value: float) -> None:
    assert sql.literal(value) is None
    assert sql.inline("debounce", "batchloop", "n", 1, value) is None


def test_sql_literal_numbers() -> None:
    assert sql.literal(1.5) == "1.5" and sql.literal(1e-05) == "1e-05"
    assert sql.literal(3) == "3" and sql.literal(True) is None
    # negative numbers parenthesised: after a "-" in the query they must not start a comment
    assert sql.literal(-7) == "(-7)" and sql.literal(-0.5) == "(-0.5)"
    text = sql.inline("debounce", "batchloop", "n", 1, 2.5)
    assert text is not None and "secs => 2.5" in text


@pytest.mark.parametrize(("mode", "state"), [("debounce_far", "running"), ("idle_far", "waiting")])
async def test_the_longest_allowed_delay_is_stored(
    migrated_dsn: str, mode: str, state: str
) -> None:
    """MAX_SECONDS stays within PostgreSQL's interval range, through the inlined COMMIT text
    (Debounce) and a bound parameter (Idle timeout) alike."""
    name = f"far-{mode}"
    input_jobs.MODES[name] = mode
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await _ping(conn, name)
        report = await bl.tick(conn, [name])
        assert report.failed == []
        st = await bl.status(conn, name)
        assert st is not None and st.state == state and st.consecutive_failures == 0
        assert st.next_run_at is not None
        expected = datetime.now(timezone.utc) + timedelta(seconds=MAX_SECONDS)
        assert abs(st.next_run_at - expected) < timedelta(hours=1)
    finally:
        await conn.close()


# ------------------------------------------------------------- 14: names with NUL


def test_check_name_refuses_nul_and_surrogates() -> None:
    from batchloop.schema_name import check_name

    for bad in (NUL_NAME, "\x00", "lone \udc80"):
        with pytest.raises(ValueError, match="worker name"):
            check_name(bad)
    assert check_name("ok é \u202e") == "ok é \u202e"


async def test_a_nul_name_is_refused_before_any_sql(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        async with conn.transaction():
            calls = [
                lambda: _ping(conn, NUL_NAME),
                lambda: bl.stop(conn, NUL_NAME),
                lambda: bl.start(conn, NUL_NAME),
                lambda: bl.status(conn, NUL_NAME),
            ]
            for call in calls:
                with pytest.raises(ValueError, match="NUL"):
                    await call()
            # no statement reached the server, so the transaction is not aborted
            assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises(ValueError, match="NUL"):
            await bl.tick(conn, [NUL_NAME])
        assert await bl.list_workers(conn) == []
    finally:
        await conn.close()
    with psycopg.connect(migrated_dsn) as sconn:
        for sync_call in (
            lambda: bls.ping(sconn, NUL_NAME, query, worker),
            lambda: bls.stop(sconn, NUL_NAME),
            lambda: bls.status(sconn, NUL_NAME),
        ):
            with pytest.raises(ValueError, match="NUL"):
                sync_call()
        assert sconn.execute("SELECT 1").fetchone() == (1,)


# ------------------------------------------------------------- 15: control characters in status


def test_printable_escapes_what_acts_on_a_terminal() -> None:
    assert printable("plain name/é ü 日本 \\x1b") == "plain name/é ü 日本 \\x1b"
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable("a\rb\nc\td\x00e\x7f\x9b") == "a\\x0db\\x0ac\\x09d\\x00e\\x7f\\x9b"
    assert printable("left \u202egnp.exe \u2066x\u2069") == "left \\u202egnp.exe \\u2066x\\u2069"
    assert printable("line\u2028sep \udc80") == "line\\u2028sep \\udc80"
    assert printable("zwj: 👩\u200d💻") == "zwj: 👩\u200d💻"  # emoji sequences stay


def _status(**kw: Any) -> WorkerStatus:
    base: dict[str, Any] = {
        "name": "n",
        "state": "running",
        "generation": 1,
        "owner": None,
        "work_query": "m:q",
        "worker": "m:w",
        "config": Config(),
        "last_work_at": None,
        "next_run_at": None,
        "batches": 0,
        "consecutive_failures": 0,
        "last_error": None,
    }
    base.update(kw)
    return WorkerStatus(**base)


def test_status_table_escapes_control_characters() -> None:
    table = format_status_table(
        [
            _status(
                name="evil\x1b[2J\r",
                last_error="boom\x1b]0;pwned\x07 \u202eoops",
                owner=Owner(host_id="h", hostname="host\x1b[1m", pid=7),
            ),
            _status(name="cfg", config_error="debounce: bad"),
        ]
    )
    assert not any(c in table for c in "\x1b\r\x07\u202e")
    _, evil, cfg = table.splitlines()
    assert evil.startswith("evil\\x1b[2J\\x0d ")
    assert "host\\x1b[1m:7" in evil and "boom\\x1b]0;pwned\\x07 \\u202eoops" in evil
    assert "config invalid: debounce: bad" in cfg


def test_cli_status_escapes_names_and_errors_but_json_is_verbatim(migrated_dsn: str) -> None:
    name = "evil\x1b[2J\x1b[H"
    error = "RuntimeError: \rhidden \x1b[31mred\u202e"
    with psycopg.connect(migrated_dsn) as conn:
        bls.ping(conn, name, query, worker)
        conn.execute(
            "UPDATE batchloop.worker_state SET last_error = %s, consecutive_failures = 1",
            (error,),
        )
    table = _cli("--dsn", migrated_dsn, "status")
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout and "\r" not in table.stdout
    assert "evil\\x1b[2J\\x1b[H" in table.stdout and "\\x1b[31mred\\u202e" in table.stdout
    one = _cli("--dsn", migrated_dsn, "status", name, "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["name"] == name
    listed = json.loads(_cli("--dsn", migrated_dsn, "status", "--json").stdout)
    assert listed[0]["name"] == name and listed[0]["last_error"] == error


# ------------------------------------------------------------- 16: type confusion


async def test_tick_refuses_what_is_not_a_dsn_or_an_asyncpg_connection(migrated_dsn: str) -> None:
    with (
        psycopg.connect(migrated_dsn, autocommit=True) as sync_conn,
        pytest.raises(TypeError, match=r"DSN string, None .* or an asyncpg Connection"),
    ):
        await bl.tick(sync_conn)
    aconn = await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True)
    try:
        with pytest.raises(TypeError, match="psycopg connections are not supported"):
            await bl.tick(aconn)
    finally:
        await aconn.close()
    for bad in (5, {"dsn": migrated_dsn}):
        with pytest.raises(TypeError, match=f"got {type(bad).__name__}"):
            await bl.tick(bad)
    pool = await asyncpg.create_pool(migrated_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(TypeError, match="acquire a connection"):
            await bl.tick(pool)
        async with pool.acquire() as pooled:  # a pool's connection is fine
            assert (await bl.tick(pooled)).checked == []
    finally:
        await pool.close()
    with pytest.raises(TypeError, match="budget"):
        await bl.tick(migrated_dsn, budget="5")


async def test_tick_refuses_a_str_for_names(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await _ping(conn, "events")
        for name in "events":
            await _ping(conn, name)  # "e", "v", ... exist too, and are due
        with pytest.raises(TypeError, match=r"names must be a list .*\['events'\]"):
            await bl.tick(conn, "events")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="names must be a list"):
            await bl.tick(conn, 5)  # type: ignore[arg-type]
        assert all(w.batches == 0 for w in await bl.list_workers(conn))  # nothing drained
        report = await bl.tick(conn, ("events",))
        assert report.drained == ["events"] and report.batches == 1
    finally:
        await conn.close()


def test_host_refuses_a_str_for_modules() -> None:
    with pytest.raises(TypeError, match=r"modules=\['pkg.mod'\]"):
        bl.Host("postgresql://nowhere/x", modules="pkg.mod")
    with pytest.raises(TypeError, match="module names"):
        bl.Host("postgresql://nowhere/x", modules=[sys])  # type: ignore[list-item]
    assert bl.Host("postgresql://nowhere/x", modules=iter(["a.b"])).modules == ("a.b",)
