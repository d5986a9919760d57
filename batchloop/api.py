"""The calls users make from their own transactions: ping, stop, start, status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from . import observe
from .drivers import session_for
from .drivers.base import Row, Session
from .migrations import code_version, refuse_newer
from .models import Config, WorkerStatus
from .observe import tracing
from .registry import resolve_callable, warn_unhostable
from .schema_name import DEFAULT_SCHEMA, check_name, check_schema
from .status import to_status, to_statuses

PingResult = Literal["created", "woken", "updated", "unchanged"]
_DEFAULT_CONFIG = Config().model_dump_json()


def ping_args(
    name: str, work_query: Callable[..., Any], worker: Callable[..., Any], config: Config | None
) -> tuple[Any, ...]:
    """Validated arguments of the ``ping`` query; raises before any SQL runs."""
    check_name(name)
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a batchloop.Config, got {type(config).__name__}")
    query_ref = resolve_callable(work_query, "work_query")
    worker_ref = resolve_callable(worker, "worker")
    warn_unhostable(query_ref, worker_ref)
    # Validated again: model_construct() (or a mutated copy) skips validation, and what is
    # stored must parse back, or status and the loop would refuse the row later.
    config_json = None
    if config is not None:
        valid = Config.model_validate(config.model_dump(warnings=False))
        config_json = valid.model_dump_json()
    return (name, query_ref, worker_ref, config_json, _DEFAULT_CONFIG, code_version())


def checked(row: Row | None, schema: str) -> Any:
    """The result of a ping, stop or start query, which skips its call and returns the newest
    recorded migration when that is newer than this code (see queries.sql): then raise."""
    assert row is not None  # one row always
    refuse_newer(row["newest"], schema)
    return row["result"]


async def ping(
    conn: Any,
    name: str,
    work_query: Callable[..., Any],
    worker: Callable[..., Any],
    *,
    config: Config | None = None,
    schema: str = DEFAULT_SCHEMA,
) -> PingResult:
    """Make sure the loop ``name`` will see the work this transaction inserts.

    Call it in the inserting transaction. Creates the worker on first use, stores changed
    callables or config (without ``config`` the stored one is kept), wakes an idle or waiting
    worker; a no-op, writing nothing, while the worker runs or is stopped.
    """
    args = ping_args(name, work_query, worker, config)
    check_schema(schema)
    started = time.perf_counter()
    with tracing.ping_span(name) as span:
        async with session_for(conn, schema) as s:
            result: PingResult = checked(await s.fetchrow("ping", *args), schema)
        tracing.ping_result(span, result)
    if observe.observers:
        observe.emit_ping(observe.PingEvent(name, result, time.perf_counter() - started))
    return result


async def stop(conn: Any, name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Stop ``name``: once this commits no more batches commit, and pings are ignored.

    Waits for an in-flight batch to commit or roll back. Returns False when there is no such
    worker; idempotent otherwise.
    """
    check_name(name)
    async with session_for(conn, check_schema(schema)) as s:
        return bool(checked(await s.fetchrow("stop", name, code_version()), schema) != "missing")


async def start(conn: Any, name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Resume a stopped worker with its stored callables and config; otherwise a no-op.

    Returns False when there is no such worker.
    """
    check_name(name)
    async with session_for(conn, check_schema(schema)) as s:
        return bool(checked(await s.fetchrow("start", name, code_version()), schema) != "missing")


async def status(conn: Any, name: str, *, schema: str = DEFAULT_SCHEMA) -> WorkerStatus | None:
    """The worker ``name``, or None if no ping ever created it."""
    check_name(name)
    async with session_for(conn, check_schema(schema)) as s:
        await _check_version(s)
        row = await s.fetchrow("status", name)
    return to_status(row) if row is not None else None


async def list_workers(conn: Any, *, schema: str = DEFAULT_SCHEMA) -> list[WorkerStatus]:
    """Every worker, ordered by name."""
    async with session_for(conn, check_schema(schema)) as s:
        await _check_version(s)
        return to_statuses(await s.fetch("status", None))


async def _check_version(s: Session) -> None:
    refuse_newer(await s.fetchval("check_version", code_version()), s.schema)
