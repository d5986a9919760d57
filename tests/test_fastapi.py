"""batchloop.fastapi and examples/fastapi_app.py under real uvicorn processes on a real database:
requests insert and ping in their transaction, a failing request leaves nothing, two replicas
share the loop, and SIGTERM drains (the in-flight batch commits, the other replica takes the
name over, the process exits 0, nothing is left unprocessed and no owner is left behind)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_deployment import pgbouncer  # noqa: E402
from web_support import free_port  # noqa: E402

import batchloop as bl  # noqa: E402
import batchloop.fastapi as blf  # noqa: E402 - module level: endpoint annotations resolve here

from helpers import count, wait_for  # noqa: E402

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "fastapi_app.py"
WORK_SECONDS = 0.3
"""The example's pretend cost of a batch: long enough for a SIGTERM to land inside one."""


class App:
    """One ``python examples/fastapi_app.py`` process (uvicorn) on a free port."""

    def __init__(self, dsn: str, log: Path, **extra_env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "BATCHLOOP_DSN": dsn,
            "PORT": str(self.port),
            "ORDER_WORK_SECONDS": str(WORK_SECONDS),
            "LOG_LEVEL": "warning",
            **extra_env,
        }
        env.pop("DATABASE_URL", None)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(APP)], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def process(self) -> str:
        """What the example records in ``orders.processed_by``."""
        return f"{socket.gethostname()}:{self.pid}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self, client: Any) -> None:
        async def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited with {self.proc.returncode}: {self.output()}")
            try:
                return (await client.get(self.url + "/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(up, timeout=30, interval=0.05, message="the app answers /healthz")

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self, timeout: float = 30.0) -> int:
        code = await wait_for(lambda: self.proc.poll(), timeout=timeout, expect=_exited)
        return int(code)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _example_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """examples/fastapi_app.py imported as the app processes import it (``fastapi_app``), so
    its callables have the names they registered there."""
    monkeypatch.syspath_prepend(str(APP.parent))
    return importlib.import_module("fastapi_app")


def _exited(code: int | None) -> bool:
    return code is not None


@pytest.fixture
def apps(migrated_dsn: str, tmp_path: Path) -> Iterator[list[App]]:
    """Two replicas of the example app on the same database (killed if a test leaves them)."""
    started = [App(migrated_dsn, tmp_path / f"app{i}.log") for i in range(2)]
    try:
        yield started
    finally:
        for app in started:
            app.kill()


@pytest.fixture
async def db(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(migrated_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def _order(client: Any, app: App, item: str, *, fail: bool = False) -> Any:
    params: dict[str, Any] = {"item": item}
    if fail:
        params["fail"] = "true"
    return await client.post(app.url + "/orders", params=params)


async def _unprocessed(db: asyncpg.Connection) -> int:
    return await count(db, "SELECT count(*) FROM orders WHERE processed_at IS NULL")


async def _batch_in_flight(db: asyncpg.Connection) -> bool:
    """A worker is inside its pretend work (the example's pg_sleep) right now."""
    n = await count(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
    )
    return n > 0


async def test_two_replicas_process_requests_and_drain_on_sigterm(
    apps: list[App], db: asyncpg.Connection, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = apps
    await asyncio.gather(a.ready(client), b.ready(client))

    # A request that raises after its insert and ping leaves neither (the first ping would
    # have created the worker).
    failed = await _order(client, a, "doomed", fail=True)
    assert failed.status_code == 500
    assert await count(db, "SELECT count(*) FROM orders") == 0
    assert await bl.status(db, "orders") is None

    # Concurrent requests on both replicas: each order is committed when its response
    # arrives (the dependency commits before the response), and all are processed.
    replies = await asyncio.gather(
        *(_order(client, (a, b)[i % 2], f"first-{i}") for i in range(40))
    )
    assert [r.status_code for r in replies] == [200] * 40
    ids = [r.json()["id"] for r in replies]
    assert await count(db, "SELECT count(*) FROM orders WHERE id = ANY($1)", ids) == 40
    await wait_for(lambda: _unprocessed(db), expect=0, timeout=30)
    # One of the two replicas runs the loop (its cooldown may end, and its ownership with it,
    # before status is read: the rows say who processed them).
    processors = await db.fetch("SELECT DISTINCT processed_by FROM orders")
    assert len(processors) == 1
    owner, other = (a, b) if processors[0]["processed_by"] == a.process else (b, a)
    assert processors[0]["processed_by"] == owner.process

    # 200 more orders at once, from a script (the example's own callables), then SIGTERM to
    # the owner while it is inside the first of their batches (50 orders, 0.3 s each).
    example = _example_module(monkeypatch)
    async with db.transaction():
        await db.execute(
            "INSERT INTO orders (item) SELECT 'burst-' || g FROM generate_series(1, 200) g"
        )
        await bl.ping(db, "orders", example.unprocessed_orders, example.process_orders)
    await wait_for(lambda: _batch_in_flight(db), timeout=30, message="a batch is in flight")
    assert await owner.terminate() == 0, owner.output()
    by = "SELECT count(*) FROM orders WHERE processed_by = $1"
    # The batch in flight at SIGTERM was let finish and committed, not cut off, and the owner
    # took no new one after it.
    by_owner = await count(db, by, owner.process)
    assert by_owner >= 40 + 50 and by_owner < 240
    st = await bl.status(db, "orders")
    assert st is not None and (st.owner is None or st.owner.pid == other.pid)  # not the dead one
    # The other replica takes the name over and processes the rest.
    await wait_for(lambda: _unprocessed(db), expect=0, timeout=30)
    assert await count(db, by, other.process) == 240 - by_owner
    assert await count(db, "SELECT count(*) FROM orders") == 240

    assert await other.terminate() == 0, other.output()
    st = await bl.status(db, "orders")
    assert st is not None and st.owner is None and not st.owner_alive
    assert not [h for h in await bl.list_hosts(db) if h.alive]
    for app in apps:
        assert "Traceback" not in app.output(), app.output()


async def test_the_example_through_pgbouncer_in_transaction_mode(
    migrated_dsn: str, db: asyncpg.Connection, client: Any, tmp_path: Path
) -> None:
    """As docker-compose.yml runs it: requests and batches through PgBouncer in transaction
    mode (BATCHLOOP_DSN), the host's control connection direct (BATCHLOOP_CONTROL_DSN)."""
    async with pgbouncer(migrated_dsn, pool_mode="transaction", pool_size=4) as pooled:
        app = App(pooled, tmp_path / "app.log", BATCHLOOP_CONTROL_DSN=migrated_dsn)
        try:
            await app.ready(client)
            replies = await asyncio.gather(*(_order(client, app, f"p-{i}") for i in range(30)))
            assert [r.status_code for r in replies] == [200] * 30
            await wait_for(lambda: _unprocessed(db), expect=0, timeout=30)
            assert await count(db, "SELECT count(*) FROM orders") == 30
            assert (await _order(client, app, "doomed", fail=True)).status_code == 500
            assert await count(db, "SELECT count(*) FROM orders") == 30
            assert await app.terminate() == 0, app.output()
        finally:
            app.kill()
    assert "Traceback" not in app.output(), app.output()


# ------------------------------------------------------------------ in-process: the module


def test_lifespan_checks_host_arguments_when_the_app_is_built() -> None:
    with pytest.raises(ValueError, match="monitor_interval"):
        blf.lifespan("postgresql://x@127.0.0.1/x", monitor_interval=0)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_lifespan_and_transaction_dependency(
    migrated_dsn: str, db: asyncpg.Connection, driver: str
) -> None:
    """The host around the app's own lifespan (whose state is passed on), and the dependency:
    committed before the response, rolled back when the endpoint raises; on both pool kinds,
    through FastAPI's real lifespan and dependency machinery (in process, over ASGI)."""
    from fastapi import FastAPI, HTTPException

    # Deferred: a duplicate fails at COMMIT, which must come before the response.
    await db.execute("CREATE TABLE probe (v text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def inner(app: Any) -> AsyncIterator[dict[str, str]]:
        host = app.state.batchloop
        assert isinstance(host, bl.Host) and host.health().ok
        seen.append("in")
        yield {"greeting": "hi"}
        seen.append("out")
        assert app.state.batchloop is host  # the host outlives the app's own lifespan

    app = FastAPI(lifespan=blf.lifespan(migrated_dsn, inner=inner, driver=driver))

    @app.post("/probe/{value}")
    async def probe(
        conn: blf.Transaction, value: str, fail: bool = False, twice: bool = False
    ) -> dict[str, str]:
        assert value.isalnum()
        for _ in range(2 if twice else 1):
            await conn.execute(f"INSERT INTO probe VALUES ('{value}')")
        if fail:
            raise HTTPException(status_code=409, detail="no")
        return {"module": type(conn).__module__.split(".")[0]}

    async with app.router.lifespan_context(app) as state:
        assert state == {"greeting": "hi"} and seen == ["in"]
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            ok = await c.post("/probe/kept")
            assert ok.status_code == 200 and ok.json() == {"module": driver}
            # Committed by the time the response arrived.
            assert await db.fetchval("SELECT string_agg(v, ',') FROM probe") == "kept"
            assert (await c.post("/probe/dropped", params={"fail": "true"})).status_code == 409
            # A commit that fails is the response: an error, not a 200 for a lost write.
            twice = await c.post("/probe/twice", params={"twice": "true"})
            assert twice.status_code == 500
    assert await db.fetchval("SELECT string_agg(v, ',') FROM probe") == "kept"
    assert seen == ["in", "out"] and app.state.batchloop is None


async def test_an_inner_lifespan_that_fails_stops_the_host(
    migrated_dsn: str, db: asyncpg.Connection
) -> None:
    from fastapi import FastAPI

    class Boom(Exception):
        pass

    @contextlib.asynccontextmanager
    async def inner(app: Any) -> AsyncIterator[None]:
        assert sum(h.alive for h in await bl.list_hosts(db)) == 1
        raise Boom
        yield

    app = FastAPI(lifespan=blf.lifespan(migrated_dsn, inner=inner))
    with pytest.raises(Boom):
        async with app.router.lifespan_context(app):
            raise AssertionError("not reached")
    assert app.state.batchloop is None
    assert not [h for h in await bl.list_hosts(db) if h.alive]


def test_lifespan_refuses_an_unknown_host_argument() -> None:
    with pytest.raises(TypeError, match="monitor_intervall"):
        blf.lifespan(None, monitor_intervall=1.0)


async def test_lifespan_on_a_plain_starlette_app(migrated_dsn: str) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def count_hosts(request: Request) -> JSONResponse:
        async with blf.host(request).pool.acquire() as conn:
            return JSONResponse({"hosts": len(await bl.list_hosts(conn))})

    app = Starlette(routes=[Route("/hosts", count_hosts)], lifespan=blf.lifespan(migrated_dsn))
    async with app.router.lifespan_context(app):
        assert isinstance(app.state.batchloop, bl.Host)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            assert (await c.get("/hosts")).json() == {"hosts": 1}
    assert app.state.batchloop is None


async def test_transaction_without_the_lifespan_says_how_to_fix_it() -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    async def index(conn: blf.Transaction) -> None:
        raise AssertionError("not reached")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        with pytest.raises(bl.BatchloopError, match=r"lifespan=batchloop\.fastapi\.lifespan"):
            await c.get("/")


def _docstring_app() -> str:
    """The complete app in batchloop.fastapi's module docstring (its first ``::`` block)."""
    doc = blf.__doc__ or ""
    lines = doc.split("::\n", 1)[1].splitlines()[1:]
    block = []
    for line in lines:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


async def test_the_module_docstring_app_runs_under_uvicorn(
    migrated_dsn: str, db: asyncpg.Connection, client: Any, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(_docstring_app())
    await db.execute("CREATE TABLE events (id bigserial PRIMARY KEY, value int)")
    port = free_port()
    env = {**os.environ, "BATCHLOOP_DSN": migrated_dsn}
    log = tmp_path / "uvicorn.log"
    proc = _popen([sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}/events"

    async def post() -> Any:
        if proc.poll() is not None:
            raise AssertionError(f"uvicorn exited: {log.read_text()}")
        try:
            return await client.post(url, params={"value": 7})
        except httpx.TransportError:
            return None

    try:
        reply = await wait_for(post, timeout=30, interval=0.05, message="uvicorn answers")
        assert reply.status_code == 200, reply.text
        st = await bl.status(db, "events")
        assert st is not None and st.worker == "app:handle_events"
        # the host in the uvicorn process processed (deleted) it
        await wait_for(lambda: count(db, "SELECT count(*) FROM events"), expect=0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await wait_for(lambda: proc.poll() is not None, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    # plain `uvicorn` re-raises the SIGTERM once it has shut down (examples/fastapi_app.py
    # exits 0 instead)
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in log.read_text(), log.read_text()


def _popen(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
