"""The ``batchloop`` command, run as ``python -m batchloop`` in a subprocess, on real databases."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import batchloop.sync as bls
from batchloop.migrations import code_version

import jobs
import psycopg_jobs
from jobs import TABLES, next_items, process_items

TESTS = Path(__file__).resolve().parent
BAD_DSN = "postgresql://someone:hunter2@127.0.0.1:1/nowhere"


def _env(**extra: str) -> dict[str, str]:
    """The environment without any DSN variable, so each test says which database it means."""
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHLOOP_DSN", "DATABASE_URL")}
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchloop", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else _env(),
        cwd=cwd,
        timeout=timeout,
    )


def _assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def _make_worker(dsn: str, name: str, items: int = 0, callables: Any = None) -> None:
    """Create the test tables if needed, then insert ``items`` for ``name`` and ping it."""
    query, worker = callables or (next_items, process_items)
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('items')").fetchone() == (None,):
            conn.execute(TABLES)
        conn.execute(
            "INSERT INTO items (name, value) SELECT %s, g FROM generate_series(1, %s) g",
            (name, items),
        )
        bls.ping(conn, name, query, worker)


def _items_left(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM items").fetchone()
    assert row is not None
    return int(row[0])


class Lines:
    """Reads a subprocess's stdout on a thread, so tests can wait for a line with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        out = proc.stdout

        def pump() -> None:
            for line in out:
                self._q.put(line)
            self._q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(self, needle: str, timeout: float = 30.0) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if needle in line:
                return seen
        raise AssertionError(f"{needle!r} not seen in output: {''.join(seen)!r}")


# ------------------------------------------------------------------------------ migrate, sql


def test_migrate_then_up_to_date(dsn: str) -> None:
    first = cli("--dsn", dsn, "migrate")
    assert first.returncode == 0, first.stderr
    assert "applied migration" in first.stdout
    second = cli("migrate", "--dsn", dsn)  # global options also work after the command
    assert second.returncode == 0, second.stderr
    assert f"up to date (version {code_version()})" in second.stdout
    with psycopg.connect(dsn, autocommit=True) as c:
        assert bls.list_workers(c) == []


def test_migrate_other_schema(dsn: str) -> None:
    proc = cli("--dsn", dsn, "--schema", "queue_x", "migrate")
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(dsn, autocommit=True) as c:
        assert bls.list_workers(c, schema="queue_x") == []


def test_sql_prints_the_schema_that_migrate_recognises(dsn: str) -> None:
    proc = cli("sql")  # needs no database
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE" in proc.stdout
    assert "BEGIN;" in proc.stdout and proc.stdout.rstrip().endswith("COMMIT;")
    assert 'CREATE SCHEMA IF NOT EXISTS "batchloop"' in proc.stdout
    # Applied by hand, it is exactly what migrate would have done.
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(proc.stdout.encode())
    assert bls.migrate(dsn) == []
    with psycopg.connect(dsn, autocommit=True) as c:
        assert bls.list_workers(c) == []

    other = cli("sql", "--schema", "elsewhere")
    assert 'CREATE SCHEMA IF NOT EXISTS "elsewhere"' in other.stdout
    assert '"batchloop"' not in other.stdout


# ------------------------------------------------------------------------------ status


def test_status_json_of_empty_database(migrated_dsn: str) -> None:
    proc = cli("--dsn", migrated_dsn, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_status_table_and_json(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "orders", items=2)
    table = cli("--dsn", migrated_dsn, "status")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.strip().splitlines()
    for column in ("NAME", "STATE", "GEN", "OWNER", "BATCHES", "FAILS", "LAST ERROR", "NEXT RUN"):
        assert column in header
    assert row.split()[:2] == ["orders", "running"]

    listed = json.loads(cli("--dsn", migrated_dsn, "status", "--json").stdout)
    assert [w["name"] for w in listed] == ["orders"]
    one = json.loads(cli("--dsn", migrated_dsn, "status", "orders", "--json").stdout)
    assert one["name"] == "orders" and one["state"] == "running"
    assert one["work_query"] == "jobs:next_items" and one["config"]["debounce"] == 0.0


def test_status_of_unknown_name_exits_1(migrated_dsn: str) -> None:
    _assert_clean_error(cli("--dsn", migrated_dsn, "status", "ghost"), "ghost")
    _assert_clean_error(cli("--dsn", migrated_dsn, "status", "ghost", "--json"), "ghost")


def test_status_of_unmigrated_database_says_migrate(dsn: str) -> None:
    _assert_clean_error(cli("--dsn", dsn, "status"), "batchloop migrate")


def test_status_watch_refreshes_until_interrupted(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "watched")
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchloop", "--dsn", migrated_dsn, "status", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        lines = Lines(proc)
        lines.wait_for("watched")
        lines.wait_for("watched")  # refreshed
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130  # interrupted, as the README says
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ stop, start


def test_stop_start_round_trip(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "mail")

    def state() -> str:
        out = cli("--dsn", migrated_dsn, "status", "mail", "--json")
        assert out.returncode == 0, out.stderr
        return str(json.loads(out.stdout)["state"])

    stopped = cli("--dsn", migrated_dsn, "stop", "mail")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert state() == "stopped"
    assert cli("--dsn", migrated_dsn, "stop", "mail").returncode == 0  # idempotent
    assert state() == "stopped"

    started = cli("--dsn", migrated_dsn, "start", "mail")
    assert started.returncode == 0, started.stderr
    assert "started" in started.stdout
    assert state() == "running"

    _assert_clean_error(cli("--dsn", migrated_dsn, "stop", "ghost"), "ghost")
    _assert_clean_error(cli("--dsn", migrated_dsn, "start", "ghost"), "ghost")


# ------------------------------------------------------------------------------ DSN and errors


@pytest.mark.parametrize("command", [["migrate"], ["status"], ["stop", "x"], ["start", "x"]])
def test_bad_dsn_exits_1_with_one_clear_line(command: list[str]) -> None:
    proc = cli("--dsn", BAD_DSN, *command, timeout=30)
    _assert_clean_error(proc, "cannot connect to PostgreSQL")
    assert "hunter2" not in proc.stderr  # the password is not echoed


def test_dsn_from_environment(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "envy")
    good = {"BATCHLOOP_DSN": migrated_dsn}
    assert json.loads(cli("status", "--json", env=_env(**good)).stdout)[0]["name"] == "envy"
    fallback = {"DATABASE_URL": migrated_dsn}
    assert json.loads(cli("status", "--json", env=_env(**fallback)).stdout)[0]["name"] == "envy"
    # BATCHLOOP_DSN wins over DATABASE_URL, and --dsn over both.
    both = _env(BATCHLOOP_DSN=BAD_DSN, DATABASE_URL=migrated_dsn)
    _assert_clean_error(cli("status", env=both), "cannot connect")
    assert cli("--dsn", migrated_dsn, "status", env=both).returncode == 0


def test_usage_errors_exit_2() -> None:
    assert cli().returncode == 2
    assert cli("frobnicate").returncode == 2
    assert cli("stop").returncode == 2  # NAME missing
    assert cli("status", "--watch", "-1").returncode == 2
    assert cli("--help").returncode == 0


def test_invalid_schema_or_name_exits_1(migrated_dsn: str) -> None:
    _assert_clean_error(cli("--dsn", migrated_dsn, "--schema", "no-dashes", "status"), "schema")
    _assert_clean_error(cli("--dsn", migrated_dsn, "stop", "x" * 201), "name")


# ------------------------------------------------------------------------------ run, tick


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_run_hosts_modules_until_sigterm(migrated_dsn: str, driver: str) -> None:
    module = {"asyncpg": jobs, "psycopg": psycopg_jobs}[driver]
    callables = (module.next_items, module.process_items)
    _make_worker(migrated_dsn, "hosted", items=0, callables=callables)
    argv = ["--dsn", migrated_dsn, "run", module.__name__, "--driver", driver]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchloop", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=TESTS,  # MODULE is imported from the current directory
    )
    try:
        lines = Lines(proc)
        lines.wait_for("running")
        _make_worker(migrated_dsn, "hosted", items=25, callables=callables)
        deadline = time.monotonic() + 20
        while _items_left(migrated_dsn) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _items_left(migrated_dsn) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        lines.wait_for("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_run_unknown_module_exits_1(migrated_dsn: str) -> None:
    _assert_clean_error(cli("--dsn", migrated_dsn, "run", "no_such_module_xyz"), "no_such_module")


def test_tick_drains_and_prints_a_json_report(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "cron", items=7)
    proc = cli("--dsn", migrated_dsn, "tick", "jobs", "--name", "cron", "--budget", "20", cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["drained"] == ["cron"]
    assert report["failed"] == []
    assert report["batches"] >= 1
    assert _items_left(migrated_dsn) == 0


# ------------------------------------------------------------------------------ demo


def test_demo_processes_every_event(dsn: str) -> None:
    proc = cli("--dsn", dsn, "demo", "--events", "2000", "--producers", "3", "--batch", "50")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "summary:" in out
    assert "processed 2,000 of 2,000 inserted OK" in out
    assert "MISMATCH" not in out
    assert "final status:" in out and "demo" in out
    assert "Traceback" not in proc.stderr
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT processed, batches FROM demo_totals").fetchone()
        assert row is not None and row[0] == 2000 and row[1] >= 40
        assert c.execute("SELECT count(*) FROM demo_events").fetchone() == (0,)
        st = bls.status(c, "demo")
        assert st is not None and st.batches == row[1]


def test_demo_twice_on_the_same_database(dsn: str) -> None:
    for _ in range(2):
        proc = cli("--dsn", dsn, "demo", "--events", "500")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "processed 500 of 500 inserted OK" in proc.stdout


def test_tick_with_a_failing_name_exits_1_and_still_reports(migrated_dsn: str) -> None:
    from jobs import bad_batch_query

    _make_worker(migrated_dsn, "cron_ok", items=0)
    with psycopg.connect(migrated_dsn) as conn:
        conn.execute("INSERT INTO items (name) VALUES ('broken')")
        bls.ping(conn, "broken", bad_batch_query, process_items)
    proc = cli("--dsn", migrated_dsn, "tick", "jobs", "--name", "broken", cwd=TESTS)
    assert proc.returncode == 1, proc
    report = json.loads(proc.stdout)
    assert [f["name"] for f in report["failed"]] == ["broken"]
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        st = bls.status(c, "broken")
    assert st is not None and st.consecutive_failures == 1 and st.last_error
