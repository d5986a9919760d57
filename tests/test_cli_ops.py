"""Operator options of the CLI in real subprocesses: ``run --control-dsn --pool-max-size
--shutdown-grace --startup-timeout``, BATCHLOOP_* variables for every option, ``sql --from N``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ops_jobs
import psycopg
import pytest

import batchloop.sync as bls
from batchloop.migrations import _applied, _prologue, code_version, migrations

TESTS = Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BATCHLOOP_") and k != "DATABASE_URL"
    }
    env.update(extra)
    return env


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchloop", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=TESTS,
        timeout=timeout,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("batchloop: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _sleepers(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE %s AND pid <> pg_backend_pid()",
            ("%ops_jobs.hold%",),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _wait(predicate: Any, timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}; last: {value!r}")
        time.sleep(0.05)


def _setup(dsn: str, names: list[str]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(ops_jobs.TABLES)
        for name in names:
            conn.execute("INSERT INTO ops_items (name) VALUES (%s)", (name,))
            bls.ping(conn, name, ops_jobs.pending, ops_jobs.hold)


def _run(dsn: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchloop", "--dsn", dsn, "run", "ops_jobs", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
        cwd=TESTS,
    )


def _stop(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, float]:
    """SIGTERM, then the exit code and how long the exit took."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()
    return rc, time.monotonic() - start


# ------------------------------------------------------------------------------ run options


def test_run_pool_max_size_caps_concurrent_batches(migrated_dsn: str) -> None:
    names = ["a", "b", "c"]
    _setup(migrated_dsn, names)
    proc = _run(migrated_dsn, "--pool-max-size", "2")
    try:
        _wait(lambda: _sleepers(migrated_dsn) == 2, what="two batches holding connections")
        # A cap cannot be shown by a condition becoming true: watch a bounded window in which
        # the third name, free to start, would have claimed a third connection.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert _sleepers(migrated_dsn) <= 2
            time.sleep(0.1)
    finally:
        _stop(proc)


def test_run_without_cap_runs_all_three(migrated_dsn: str) -> None:
    """The contrast for the test above: the same three names, default pool, all at once."""
    _setup(migrated_dsn, ["a", "b", "c"])
    proc = _run(migrated_dsn)
    try:
        _wait(lambda: _sleepers(migrated_dsn) == 3, what="three batches at once")
    finally:
        _stop(proc)


def test_run_shutdown_grace_from_environment(migrated_dsn: str) -> None:
    _setup(migrated_dsn, ["a"])
    proc = _run(migrated_dsn, BATCHLOOP_SHUTDOWN_GRACE="0.5")
    _wait(lambda: _sleepers(migrated_dsn) == 1, what="the batch in flight")
    rc, took = _stop(proc)
    assert rc == 0
    # Default grace is 10 s; the batch sleeps 600 s, so only the 0.5 s grace explains this.
    assert took < 8.0, took
    with psycopg.connect(migrated_dsn, autocommit=True) as c:  # cut off: rolled back
        assert c.execute("SELECT count(*) FROM ops_items").fetchone() == (1,)


def test_run_startup_timeout(tmp_path: Path) -> None:
    # Nothing listens on port 1: the host retries until the startup timeout.
    dead = "postgresql://root@127.0.0.1:1/nothing?connect_timeout=1"
    start = time.monotonic()
    proc = cli("--dsn", dead, "run", "ops_jobs", "--startup-timeout", "1", timeout=60)
    took = time.monotonic() - start
    _one_error_line(proc, 1)
    assert took < 20.0, took  # the default would retry for 30 s


def test_run_control_dsn_is_used(migrated_dsn: str, dsn: str) -> None:
    # A control DSN that leads elsewhere is refused: proof the option reaches the host.
    other = migrated_dsn.rsplit("/", 1)[0] + "/postgres"
    _setup(migrated_dsn, [])
    proc = cli("--dsn", migrated_dsn, "run", "ops_jobs", "--control-dsn", other, timeout=60)
    _one_error_line(proc, 1, "lead to different databases")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pool-max-size", "0"], "--pool-max-size: must be at least 1"),
        (["--shutdown-grace", "-1"], "--shutdown-grace: must be a number of seconds >= 0"),
        (["--startup-timeout", "soon"], "--startup-timeout: not a number"),
    ],
)
def test_run_bad_option_values(args: list[str], needle: str) -> None:
    proc = cli("run", "ops_jobs", *args)
    _one_error_line(proc, 2, needle)


# ------------------------------------------------------------------------------ environment


def test_environment_sets_schema_and_command_line_wins(dsn: str) -> None:
    proc = cli("migrate", BATCHLOOP_DSN=dsn, BATCHLOOP_SCHEMA="from_env")
    assert proc.returncode == 0, proc.stderr
    assert "'from_env'" in proc.stdout
    with psycopg.connect(dsn, autocommit=True) as c:
        assert bls.list_workers(c, schema="from_env") == []
    proc = cli("--schema", "from_cli", "migrate", BATCHLOOP_DSN=dsn, BATCHLOOP_SCHEMA="from_env")
    assert proc.returncode == 0, proc.stderr
    assert "'from_cli'" in proc.stdout


def test_environment_flag_and_subcommand_option(migrated_dsn: str) -> None:
    proc = cli("status", BATCHLOOP_DSN=migrated_dsn, BATCHLOOP_JSON="true")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    proc = cli("status", BATCHLOOP_DSN=migrated_dsn, BATCHLOOP_JSON="0")
    assert proc.returncode == 0 and "no workers" in proc.stdout


def test_environment_bad_value_names_the_variable() -> None:
    proc = cli("run", "ops_jobs", BATCHLOOP_POOL_MAX_SIZE="0")
    _one_error_line(proc, 2, "BATCHLOOP_POOL_MAX_SIZE='0'", "must be at least 1")
    proc = cli("run", "ops_jobs", BATCHLOOP_DRIVER="mysql")
    _one_error_line(proc, 2, "BATCHLOOP_DRIVER", "choose from asyncpg, psycopg")
    proc = cli("status", BATCHLOOP_JSON="maybe")
    _one_error_line(proc, 2, "BATCHLOOP_JSON", "1/0")


def test_environment_for_another_command_is_ignored() -> None:
    proc = cli("sql", BATCHLOOP_POOL_MAX_SIZE="zero", BATCHLOOP_PORT="x")
    assert proc.returncode == 0, proc.stderr
    assert "CREATE TABLE" in proc.stdout


def test_help_documents_the_environment_rule() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "BATCHLOOP_POOL_MAX_SIZE" in text and "The command line wins" in text


# ------------------------------------------------------------------------------ sql --from


def _versions(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute("SELECT version FROM batchloop.schema_migrations ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def _migrate_to(dsn: str, version: int) -> None:
    """An older batchloop's migrate: the first ``version`` migrations, applied as the runner
    applies them."""
    script = "\n".join(
        ["BEGIN;", _prologue("batchloop")]
        + [_applied("batchloop", m.sql, [m]) for m in migrations()[:version]]
        + ["COMMIT;"]
    )
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(script.encode())


@pytest.mark.parametrize("start", [0, 2])
def test_sql_from_upgrades_like_migrate(dsn: str, start: int) -> None:
    if start:
        _migrate_to(dsn, start)
        assert _versions(dsn) == list(range(1, start + 1))
    proc = cli("sql", "--from", str(start))
    assert proc.returncode == 0, proc.stderr
    assert f"upgrade from version {start} to {code_version()}" in proc.stdout
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(proc.stdout.encode())
    assert _versions(dsn) == list(range(1, code_version() + 1))
    assert bls.migrate(dsn) == []  # migrate sees nothing left to do
    with psycopg.connect(dsn) as conn:  # and the schema works
        conn.execute(ops_jobs.TABLES)
        bls.ping(conn, "x", ops_jobs.pending, ops_jobs.hold)
        assert bls.status(conn, "x") is not None


def test_sql_from_current_is_empty_and_wrong_version_fails(migrated_dsn: str) -> None:
    proc = cli("sql", "--from", str(code_version()))
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert "BEGIN" not in proc.stdout
    # Applied to a schema that already has those migrations, it fails and changes nothing.
    script = cli("sql", "--from", "1").stdout
    with psycopg.connect(migrated_dsn, autocommit=True) as c, pytest.raises(psycopg.Error):
        c.execute(script.encode())
    assert _versions(migrated_dsn) == list(range(1, code_version() + 1))


@pytest.mark.parametrize(("value", "code"), [("99", 1), ("-1", 2), ("x", 2)])
def test_sql_from_bad_version(value: str, code: int) -> None:
    proc = cli("sql", "--from", value)
    _one_error_line(proc, code)
    assert proc.stdout == ""
