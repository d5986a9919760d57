"""Callables defined in a program's main module: ``python -m pkg.mod`` registers them under the
real module name; ``python x.py`` cannot, and says so at ping time, in the host's log and in
``batchloop status``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from test_cli import Lines

import batchloop.sync as bls

JOBS = """
import os

import psycopg

import batchloop as bl
import batchloop.sync as bls


@bl.work_query
async def next_x(conn, name):
    rows = await conn.fetch("SELECT id FROM xq ORDER BY id LIMIT 10")
    return bl.Work([r["id"] for r in rows]) if rows else bl.Idle()


@bl.worker
async def handle_x(conn, batch):
    await conn.execute("DELETE FROM xq WHERE id = ANY($1::bigint[])", batch)


if __name__ == "__main__":
    with psycopg.connect(os.environ["BATCHLOOP_DSN"]) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS xq (id bigserial PRIMARY KEY)")
        conn.execute("INSERT INTO xq SELECT FROM generate_series(1, 5)")
        print("ping:", bls.ping(conn, "xq", next_x, handle_x), flush=True)
"""


def _env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHLOOP_DSN", "DATABASE_URL")}
    env["BATCHLOOP_DSN"] = dsn
    return env


def _python(*args: str, dsn: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=_env(dsn), cwd=cwd, timeout=60
    )


def _left(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM xq").fetchone()
    assert row is not None
    return int(row[0])


def _host(dsn: str, cwd: Path, module: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchloop", "run", module],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(dsn),
        cwd=cwd,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stderr.read() if proc.stderr else ""


def test_python_dash_m_registers_the_real_module_name(migrated_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text("")
    (tmp_path / "pkgx" / "mod.py").write_text(JOBS)
    done = _python("-m", "pkgx.mod", dsn=migrated_dsn, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "python file.py" not in done.stderr  # no warning: the name is importable
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        st = bls.status(c, "xq")
    assert st is not None
    assert (st.work_query, st.worker) == ("pkgx.mod:next_x", "pkgx.mod:handle_x")
    # A host in another process runs them.
    host = _host(migrated_dsn, tmp_path, "pkgx.mod")
    try:
        deadline = time.monotonic() + 30
        while _left(migrated_dsn) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _left(migrated_dsn) == 0
    finally:
        _stop(host)


def test_plain_script_says_so_at_ping_in_the_host_and_in_status(
    migrated_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "xjobs.py").write_text(JOBS)
    done = _python("xjobs.py", dsn=migrated_dsn, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ping: created" in done.stdout
    warning = " ".join(done.stderr.split())
    assert "__main__:next_x and __main__:handle_x are defined in a script" in warning
    assert "importable module" in warning

    # A host importing the same file as a module cannot run them, and says why, naming it.
    host = _host(migrated_dsn, tmp_path, "xjobs")
    try:
        lines = Lines(host)
        lines.wait_for("running")
    finally:
        err = _stop(host)
    assert "cannot run 'xq'" in err and "importable module" in err, err
    assert _left(migrated_dsn) == 5

    status = subprocess.run(
        [sys.executable, "-m", "batchloop", "status"],
        capture_output=True,
        text=True,
        env=_env(migrated_dsn),
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "note: worker 'xq'" in status.stdout and "importable module" in status.stdout


def test_script_with_its_own_host_does_not_warn(migrated_dsn: str, tmp_path: Path) -> None:
    script = (
        JOBS.split('if __name__ == "__main__":')[0]
        + """
import asyncio


async def main():
    async with bl.Host(os.environ["BATCHLOOP_DSN"], modules=[__name__]) as host:
        async with host.pool.acquire() as conn:
            await conn.execute("CREATE TABLE xq (id bigserial PRIMARY KEY)")
            async with conn.transaction():
                await conn.execute("INSERT INTO xq SELECT FROM generate_series(1, 5)")
                print("ping:", await bl.ping(conn, "xq", next_x, handle_x), flush=True)
            while await conn.fetchval("SELECT count(*) FROM xq"):
                await asyncio.sleep(0.05)


asyncio.run(main())
"""
    )
    (tmp_path / "selfhosted.py").write_text(script)
    done = _python("selfhosted.py", dsn=migrated_dsn, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ping: created" in done.stdout
    assert "python file.py" not in done.stderr


@pytest.mark.parametrize("spec_name", ["pkgy.mod", None])
def test_ref_of_main_module(spec_name: str | None, tmp_path: Path) -> None:
    """Pure: the ref a function of ``__main__`` gets, with and without a spec."""
    code = (
        "import sys, types, importlib.machinery as m\n"
        "import batchloop.registry as r\n"
        "main = sys.modules['__main__']\n"
        f"main.__spec__ = m.ModuleSpec({spec_name!r}, None) if {spec_name!r} else None\n"
        "async def f(conn, name): pass\n"
        "print(r.ref_of(f))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{spec_name or '__main__'}:f"


def test_python_dash_m_whose_host_imports_itself(migrated_dsn: str, tmp_path: Path) -> None:
    """``python -m pkgz.mod`` with ``Host(modules=["pkgz.mod"])`` runs the module twice (as
    ``__main__`` and as ``pkgz.mod``): ping accepts either copy of the callables."""
    script = (
        JOBS.split('if __name__ == "__main__":')[0]
        + """
import asyncio


async def main():
    async with bl.Host(os.environ["BATCHLOOP_DSN"], modules=["pkgz.mod"]) as host:
        async with host.pool.acquire() as conn:
            await conn.execute("CREATE TABLE xq (id bigserial PRIMARY KEY)")
            async with conn.transaction():
                await conn.execute("INSERT INTO xq SELECT FROM generate_series(1, 5)")
                print("ping:", await bl.ping(conn, "xq", next_x, handle_x), flush=True)
            while await conn.fetchval("SELECT count(*) FROM xq"):
                await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
"""
    )
    (tmp_path / "pkgz").mkdir()
    (tmp_path / "pkgz" / "__init__.py").write_text("")
    (tmp_path / "pkgz" / "mod.py").write_text(script)
    done = _python("-m", "pkgz.mod", dsn=migrated_dsn, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ping: created" in done.stdout
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        st = bls.status(c, "xq")
    assert st is not None and st.work_query == "pkgz.mod:next_x"
