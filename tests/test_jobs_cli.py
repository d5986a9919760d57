"""``batchloop jobs list|show|cancel|retry`` run as ``python -m batchloop`` in a subprocess, on
real databases; jobs are dispatched (and, where a test needs final states, run by a real
``Host``) from the test process. The CLI process imports no job module: it only reads rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import surface_jobs as sj

import batchloop as bl
import batchloop.jobs as jobs

from helpers import wait_for

pytestmark = pytest.mark.anyio
TESTS = Path(__file__).resolve().parent
BAD_DSN = "postgresql://someone:hunter2@127.0.0.1:1/nowhere"


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BATCHLOOP_") and k != "DATABASE_URL"
    }
    env.update(extra)
    return env


def cli_sync(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchloop", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd="/",  # nothing of the tests' own on the path: the CLI imports no job module
        timeout=60,
    )


async def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: cli_sync(*args, **env))


def one_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, proc
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("batchloop: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


async def dispatch_some(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            ids = {
                "ann": await sj.greet.dispatch(conn, sj.Greeting(name="ann"), key="greet:ann"),
                "bob": await sj.greet.dispatch(conn, sj.Greeting(name="bob"), delay=3600.0),
                "seven": await sj.count.dispatch(conn, sj.Number(n=7)),
            }
    finally:
        await conn.close()
    return ids


async def status_of(dsn: str, job_id: int) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        run = await jobs.get(conn, job_id)
    finally:
        await conn.close()
    return None if run is None else run.status


async def test_list_filters_and_json(migrated_dsn: str) -> None:
    ids = await dispatch_some(migrated_dsn)
    proc = await cli("jobs", "list", "--dsn", migrated_dsn)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.strip().splitlines()
    assert header.split()[:4] == ["ID", "TYPE", "QUEUE", "STATUS"]
    assert sorted(int(r.split()[0]) for r in rows) == sorted(ids.values())
    assert all("pending" in r for r in rows)

    proc = await cli("jobs", "list", "--queue", sj.OTHER_QUEUE, "--json", dsn_env(migrated_dsn))
    found = json.loads(proc.stdout)
    assert [j["id"] for j in found] == [ids["seven"]]
    assert found[0]["type"] == "surf.count" and found[0]["payload"] == {"n": 7}
    assert found[0]["status"] == "pending" and found[0]["attempts"] == 0

    proc = await cli("jobs", "list", "--type", "surf.greet", "--json", dsn_env(migrated_dsn))
    assert sorted(j["id"] for j in json.loads(proc.stdout)) == sorted([ids["ann"], ids["bob"]])
    proc = await cli("jobs", "list", "--limit", "1", "--json", dsn_env(migrated_dsn))
    assert len(json.loads(proc.stdout)) == 1
    proc = await cli("jobs", "list", "--status", "failed", dsn_env(migrated_dsn))
    assert proc.returncode == 0 and proc.stdout.strip() == "no jobs"
    # BATCHLOOP_* variables set the nested command's options too.
    proc = await cli(
        "jobs", "list", "--json", BATCHLOOP_DSN=migrated_dsn, BATCHLOOP_QUEUE=sj.OTHER_QUEUE
    )
    assert [j["id"] for j in json.loads(proc.stdout)] == [ids["seven"]]


def dsn_env(dsn: str) -> str:
    """``--dsn=DSN`` as one argument (keeps the calls above short)."""
    return f"--dsn={dsn}"


async def test_show_one_job(migrated_dsn: str) -> None:
    ids = await dispatch_some(migrated_dsn)
    proc = await cli("jobs", "show", str(ids["ann"]), dsn_env(migrated_dsn))
    assert proc.returncode == 0, proc.stderr
    fields = dict(
        line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line and line[0] != " "
    )
    assert fields["type"].strip() == "surf.greet"
    assert fields["status"].strip() == "pending"
    assert fields["key"].strip() == "greet:ann"
    assert json.loads(fields["payload"]) == {"name": "ann"}
    proc = await cli("jobs", "show", str(ids["ann"]), "--json", dsn_env(migrated_dsn))
    shown = json.loads(proc.stdout)
    assert shown["id"] == ids["ann"] and shown["key"] == "greet:ann"
    assert shown["max_attempts"] == 3 and shown["progress"] == 0


async def test_cancel_and_retry(migrated_dsn: str) -> None:
    ids = await dispatch_some(migrated_dsn)
    bob = str(ids["bob"])
    proc = await cli("jobs", "cancel", bob, dsn_env(migrated_dsn))
    assert proc.returncode == 0, proc.stderr
    assert "canceled job" in proc.stdout
    assert await status_of(migrated_dsn, ids["bob"]) == "canceled"
    # Canceling a final job is an error the user can act on.
    one_error(await cli("jobs", "cancel", bob, dsn_env(migrated_dsn)), 1, "already canceled")
    proc = await cli("jobs", "retry", bob, dsn_env(migrated_dsn))
    assert proc.returncode == 0, proc.stderr
    assert await status_of(migrated_dsn, ids["bob"]) == "pending"
    # A pending job cannot be retried.
    one_error(
        await cli("jobs", "retry", bob, dsn_env(migrated_dsn)), 1, "pending", "failed or canceled"
    )
    assert await status_of(migrated_dsn, ids["ann"]) == "pending"  # the others untouched


async def test_cancel_of_a_job_whose_on_complete_only_a_host_can_call(migrated_dsn: str) -> None:
    """The CLI imports no job module, so it cannot call on_complete: it flags the cancel, the
    job never runs, and the queue's loop records it (calling on_complete once)."""
    conn = await asyncpg.connect(migrated_dsn)
    try:
        async with conn.transaction():
            job_id = await sj.tracked.dispatch(conn, sj.Number(n=1), delay=3600.0)
        proc = await cli("jobs", "cancel", str(job_id), dsn_env(migrated_dsn))
        assert proc.returncode == 0, proc.stderr
        assert "cancel requested" in proc.stdout and "will not run" in proc.stdout
        proc = await cli("jobs", "show", str(job_id), dsn_env(migrated_dsn))
        assert "pending (cancel requested)" in proc.stdout
        async with bl.Host(migrated_dsn, modules=["surface_jobs"]):
            await wait_for(lambda: status_of(migrated_dsn, job_id), expect="canceled", timeout=30)
        assert sj.COMPLETED.count((job_id, "canceled")) == 1
    finally:
        await conn.close()


async def test_final_states_show_result_and_error(migrated_dsn: str) -> None:
    """A real host runs the jobs; the CLI then shows the result, and the failure's error."""
    conn = await asyncpg.connect(migrated_dsn)
    try:
        async with bl.Host(migrated_dsn, modules=["surface_jobs"]):
            async with conn.transaction():
                good = await sj.greet.dispatch(conn, sj.Greeting(name="cy"))
                bad = await sj.boom.dispatch(conn, sj.Number(n=41))

            async def final() -> bool:
                runs = [await jobs.get(conn, i) for i in (good, bad)]
                return all(r is not None and r.status in ("completed", "failed") for r in runs)

            await wait_for(final, timeout=30)
    finally:
        await conn.close()
    proc = await cli("jobs", "show", str(good), "--json", dsn_env(migrated_dsn))
    shown = json.loads(proc.stdout)
    assert shown["status"] == "completed" and shown["result"] == {"greeting": "hello cy"}
    proc = await cli("jobs", "show", str(bad), dsn_env(migrated_dsn))
    assert proc.returncode == 0
    assert "failed" in proc.stdout and "boom 41: no such account" in proc.stdout
    assert "\x1b" not in proc.stdout and "\\x1b[2J" in proc.stdout  # escaped, not sent
    proc = await cli("jobs", "list", "--status", "failed", dsn_env(migrated_dsn))
    rows = proc.stdout.strip().splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == [bad]
    assert "boom 41" in rows[0]
    # Retrying the failed one puts it back to pending with its attempts reset.
    proc = await cli("jobs", "retry", str(bad), dsn_env(migrated_dsn))
    assert proc.returncode == 0, proc.stderr
    proc = await cli("jobs", "show", str(bad), "--json", dsn_env(migrated_dsn))
    again: dict[str, Any] = json.loads(proc.stdout)
    assert again["status"] == "pending" and again["attempts"] == 0


async def test_bad_input_is_one_line(migrated_dsn: str) -> None:
    one_error(
        await cli("jobs", "show", "999999", dsn_env(migrated_dsn)), 1, "no job with id 999999"
    )
    one_error(await cli("jobs", "cancel", "999999", dsn_env(migrated_dsn)), 1, "no job with id")
    one_error(await cli("jobs", "retry", "999999", dsn_env(migrated_dsn)), 1, "no job with id")
    one_error(await cli("jobs", "show", "abc", dsn_env(migrated_dsn)), 2, "whole number")
    one_error(await cli("jobs", "cancel", "0", dsn_env(migrated_dsn)), 2, "1 or more")
    one_error(await cli("jobs", "show", str(2**63), dsn_env(migrated_dsn)), 2, "bigint")
    one_error(await cli("jobs", "list", "--status", "done", dsn_env(migrated_dsn)), 2, "--status")
    one_error(await cli("jobs", "list", "--limit", "0", dsn_env(migrated_dsn)), 2, "at least 1")
    one_error(await cli("jobs", dsn_env(migrated_dsn)), 2)
    bad = one_error(await cli("jobs", "list", dsn_env(BAD_DSN)), 1, "cannot connect")
    assert "hunter2" not in bad
    bad = one_error(await cli("jobs", "list", BATCHLOOP_DSN=BAD_DSN), 1)
    assert "hunter2" not in bad


async def test_unmigrated_database_is_one_line(dsn: str) -> None:
    one_error(await cli("jobs", "list", dsn_env(dsn)), 1, "batchloop migrate")
