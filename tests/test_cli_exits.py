"""The CLI's exit codes and messages for interruptions, broken modules, missing DSNs and such,
run as ``python -m batchloop`` in subprocesses on real databases."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from test_cli import TESTS, Lines, _assert_clean_error, _env, _make_worker, cli

import batchloop as bl
import batchloop.sync as bls

from jobs import knobs, next_items, process_items
from proxy import Proxy


def _popen(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchloop", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=cwd,
    )


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ Ctrl-C


def test_run_exits_130_on_ctrl_c(migrated_dsn: str) -> None:
    proc = _popen("--dsn", migrated_dsn, "run", "jobs", cwd=TESTS)
    try:
        Lines(proc).wait_for("running")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        _end(proc)


def test_status_watch_exits_130_on_ctrl_c(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "watched")
    proc = _popen("--dsn", migrated_dsn, "status", "--watch", "0.1")
    try:
        Lines(proc).wait_for("watched")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        _end(proc)


def test_status_watch_waits_out_a_lost_database(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "watched")
    with Proxy(5432) as proxy:
        proc = _popen("--dsn", proxy.dsn(migrated_dsn), "status", "--watch", "0.1")
        try:
            lines = Lines(proc)
            lines.wait_for("watched")
            proxy.cut()  # the connection is reset; the next one goes through again
            lines.wait_for("database unavailable")
            lines.wait_for("watched")
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 130
        finally:
            _end(proc)


# ------------------------------------------------------------------------------ modules


@pytest.mark.parametrize("command", ["run", "tick"])
@pytest.mark.parametrize(
    ("source", "needle"),
    [("def broken(:\n", "SyntaxError"), ("raise RuntimeError('boom at import')\n", "boom")],
)
def test_a_broken_module_is_one_line(
    migrated_dsn: str, tmp_path: Path, command: str, source: str, needle: str
) -> None:
    (tmp_path / "broken_mod.py").write_text(source)
    proc = cli("--dsn", migrated_dsn, command, "broken_mod", cwd=tmp_path)
    _assert_clean_error(proc, "batchloop: error: ", "broken_mod", needle)
    verbose = cli("--dsn", migrated_dsn, command, "broken_mod", "-v", cwd=tmp_path)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr


@pytest.mark.parametrize("command", ["run", "tick"])
def test_modules_that_register_nothing_exit_1(
    migrated_dsn: str, tmp_path: Path, command: str
) -> None:
    (tmp_path / "empty_mod.py").write_text("X = 1\n")
    proc = cli("--dsn", migrated_dsn, command, "empty_mod", cwd=tmp_path)
    _assert_clean_error(proc, "empty_mod", "registered no work query or worker")


def test_tick_of_an_unknown_name_exits_1(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "known", items=1)
    proc = cli("--dsn", migrated_dsn, "tick", "jobs", "--name", "NOPE", cwd=TESTS)
    assert proc.returncode == 1, proc
    assert "no worker named 'NOPE'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ messages


def test_no_dsn_and_no_server_says_how_to_give_one(tmp_path: Path) -> None:
    env = _env(PGHOST="127.0.0.1", PGPORT="1", PGCONNECT_TIMEOUT="2")
    proc = cli("status", env=env)
    _assert_clean_error(proc, "batchloop: error: ", "--dsn", "BATCHLOOP_DSN")


def test_missing_schema_names_the_database(dsn: str) -> None:
    proc = cli("--dsn", dsn, "status")
    database = dsn.rsplit("/", 1)[1]
    _assert_clean_error(proc, "batchloop migrate", f"database '{database}'")


def test_every_error_has_the_same_prefix(migrated_dsn: str) -> None:
    for proc in (
        cli("--dsn", migrated_dsn, "status", "ghost"),  # a command error
        cli("--dsn", migrated_dsn, "run", "no_such_module_xyz"),
        cli("--dsn", "postgresql://u@127.0.0.1:1/x", "status"),  # a connection error
    ):
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith("batchloop: error: "), proc.stderr
    usage = cli("status", "--watch", "-1")
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines()[-1].startswith("batchloop: error: "), usage.stderr


@pytest.mark.anyio
async def test_iteration_timeout_is_recorded_by_name(migrated_dsn: str) -> None:
    _make_worker(migrated_dsn, "slowpoke", items=1)
    with psycopg.connect(migrated_dsn) as conn:
        bls.ping(
            conn, "slowpoke", next_items, process_items, config=bl.Config(iteration_timeout=0.3)
        )
    knobs("slowpoke").sleep = 30.0
    try:
        report = await bl.tick(migrated_dsn, ["slowpoke"], budget=5.0)
    finally:
        knobs("slowpoke").sleep = 0.0
    assert [f.name for f in report.failed] == ["slowpoke"]
    assert "iteration_timeout (0.3 s) exceeded" in report.failed[0].error
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        st = bls.status(conn, "slowpoke")
    assert st is not None and st.last_error is not None
    assert "iteration_timeout (0.3 s) exceeded" in st.last_error
