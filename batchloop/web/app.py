"""The status page: one HTML page, one JS file and one CSS file served from the package, and
JSON endpoints it polls. No build step and no CDN, so it works air-gapped.

Read-only unless a token is configured; then stop / start / wake need ``Authorization: Bearer
TOKEN``. Every value reaches the page through ``textContent`` (see static/app.js), so names and
errors containing HTML are shown, never run.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg

import batchloop

from ..errors import SchemaMissingError
from ..schema_name import DEFAULT_SCHEMA, check_schema
from .queues import queue_counts

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the status page needs the 'web' extra: pip install 'batchloop[web]'"
    ) from exc

log = logging.getLogger("batchloop")
STATIC = Path(__file__).resolve().parent / "static"

Action = Callable[..., Awaitable[bool]]


def _actions() -> dict[str, Action]:
    return {"stop": batchloop.stop, "start": batchloop.start, "wake": batchloop.wake}


def create_app(
    dsn: str | None,
    *,
    token: str | None = None,
    schema: str = DEFAULT_SCHEMA,
    pool_max_size: int = 4,
) -> Starlette:
    """The status page as a Starlette app, with its own asyncpg pool opened by its lifespan.

    ``token``: None makes the page read-only (actions answer 403); otherwise the actions need
    ``Authorization: Bearer <token>``."""
    check_schema(schema)
    if token is not None and not token:
        raise ValueError("token must not be empty: pass a secret, or None for a read-only page")
    expected = token.encode() if token is not None else None
    state: dict[str, asyncpg.Pool] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_max_size)
        state["pool"] = pool
        try:
            yield
        finally:
            await pool.close()

    def authorized(request: Request) -> bool:
        if expected is None:
            return False
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), expected)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def workers(request: Request) -> Response:
        async with state["pool"].acquire() as conn:
            found = await batchloop.list_workers(conn, schema=schema)
        return JSONResponse([w.model_dump(mode="json") for w in found])

    async def hosts(request: Request) -> Response:
        async with state["pool"].acquire() as conn:
            found = await batchloop.list_hosts(conn, schema=schema)
        return JSONResponse([h.model_dump(mode="json") for h in found])

    async def queues(request: Request) -> Response:
        """Every job queue with its jobs counted by status (batchloop.jobs)."""
        async with state["pool"].acquire() as conn:
            try:
                found = await queue_counts(conn, schema=schema)
            except SchemaMissingError:
                return JSONResponse(
                    {"error": "no jobs table in this schema: run `batchloop migrate`"},
                    status_code=503,
                )
        return JSONResponse([q.model_dump(mode="json") for q in found])

    async def session(request: Request) -> Response:
        """What the page may offer: whether actions exist at all and whether this request's
        token is right (the token form checks it here before showing any button)."""
        return JSONResponse(
            {
                "read_only": expected is None,
                "authorized": authorized(request),
                "actions": sorted(_actions()),
                "schema": schema,
            }
        )

    async def act(request: Request) -> Response:
        action = request.path_params["action"]
        if not authorized(request):
            why = "read-only page (started without --token)" if expected is None else "bad token"
            return JSONResponse({"error": f"forbidden: {why}"}, status_code=403)
        run = _actions().get(action)
        if run is None:
            return JSONResponse({"error": f"unknown action {action!r}"}, status_code=404)
        try:
            body = await request.json()
        except ValueError:
            body = None
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return JSONResponse(
                {"error": 'the body must be JSON {"name": "<worker name>"}'}, status_code=400
            )
        async with state["pool"].acquire() as conn:
            done = await run(conn, name, schema=schema)
            now = await batchloop.status(conn, name, schema=schema)
        if now is None:
            return JSONResponse({"error": f"no worker named {name!r}"}, status_code=404)
        log.info("status page: %s %r (done: %s)", action, name, done)
        return JSONResponse({"name": name, "action": action, "done": done, "state": now.state})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/workers", workers),
            Route("/api/hosts", hosts),
            Route("/api/queues", queues),
            Route("/api/session", session),
            Route("/api/workers/{action}", act, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
