"""Metrics, spans and log fields from a real Host draining a name (batchloop.observe)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
import observe_jobs
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import batchloop as bl
from batchloop import observe
from batchloop.observe import logs, tracing
from batchloop.observe.metrics import Metrics

from helpers import wait_for
from jobs import create_tables, insert_and_ping

pytestmark = pytest.mark.anyio


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.addFilter(logs.ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def observed() -> Iterator[tuple[Metrics, InMemorySpanExporter, Collect]]:
    metrics = Metrics()
    unregister = observe.register(metrics)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider, callables=True)
    handler = Collect()
    loggers = [logging.getLogger("observe_jobs"), logging.getLogger("batchloop")]
    for logger in loggers:
        logger.addHandler(handler)
    old_level = loggers[0].level
    loggers[0].setLevel(logging.INFO)
    try:
        yield metrics, exporter, handler
    finally:
        loggers[0].setLevel(old_level)
        for logger in loggers:
            logger.removeHandler(handler)
        tracing.use(None)
        unregister()


def value(metrics: Metrics, series: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.text()):
        for s in family.samples:
            if s.name == series and s.labels == labels:
                return s.value
    return None


async def test_host_drain_reports_metrics_spans_and_log_fields(
    migrated_dsn: str, observed: tuple[Metrics, InMemorySpanExporter, Collect]
) -> None:
    metrics, exporter, handler = observed
    observe_jobs.FAIL["times"] = 1
    observe_jobs.WORKER_SPANS.clear()
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        async with bl.Host(migrated_dsn, modules=["observe_jobs"]) as host:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO items (name) SELECT 'obs' FROM generate_series(1, 25)"
                )
                assert await bl.ping(conn, "obs", observe_jobs.take, observe_jobs.put) == "created"
            await wait_for(lambda: value(metrics, "batchloop_batches_total", name="obs"), expect=3)
            # Idle(cooldown=0): the loop goes idle at once and gives the name up.
            await wait_for(lambda: value(metrics, "batchloop_owned_names"), expect=0)
            status = await bl.status(conn, "obs")
            host_id = host.host_id
    finally:
        await conn.close()
    assert status is not None and status.state == "idle"
    generation = status.generation

    # metrics
    assert value(metrics, "batchloop_failures_total", name="obs") == 1
    assert value(metrics, "batchloop_iteration_seconds_count", name="obs") == 4
    assert value(metrics, "batchloop_batch_items_sum", name="obs") == 25
    assert value(metrics, "batchloop_iterations_total", name="obs", outcome="idle") == 1
    assert (value(metrics, "batchloop_ownership_changes_total", kind="claim") or 0) >= 1
    assert (value(metrics, "batchloop_ownership_changes_total", kind="release") or 0) >= 1
    assert value(metrics, "batchloop_pings_total", result="created") == 1

    # spans
    finished = exporter.get_finished_spans()
    iterations = [s for s in finished if s.name == "batchloop.iteration"]
    outcomes = sorted(str(s.attributes["batchloop.outcome"]) for s in iterations)
    assert outcomes == ["committed"] * 3 + ["failed", "idle"]
    for span in iterations:
        assert span.attributes["batchloop.name"] == "obs"
        assert span.attributes["batchloop.generation"] == generation
    by_id = {s.context.span_id: s for s in finished}
    committed = {
        s.context.span_id for s in iterations if s.attributes["batchloop.outcome"] == "committed"
    }
    for kind in ("batchloop.work_query", "batchloop.worker"):
        parents = {s.parent.span_id for s in finished if s.name == kind and s.parent}
        assert committed <= parents
    # the user's code inside the worker runs under the batchloop.worker span
    assert len(observe_jobs.WORKER_SPANS) == 4
    for current in observe_jobs.WORKER_SPANS:
        span = by_id[current.get_span_context().span_id]
        assert span.name == "batchloop.worker"
        assert by_id[span.parent.span_id].name == "batchloop.iteration"
    (ping,) = [s for s in finished if s.name == "batchloop.ping"]
    assert ping.attributes["batchloop.ping.result"] == "created"

    # logs: the user's records inside the callables, and batchloop's own about the name
    def about(record: logging.LogRecord) -> Any:
        return (record.batchloop_name, record.batchloop_generation, record.batchloop_host)  # type: ignore[attr-defined]

    mine = [r for r in handler.records if r.name == "observe_jobs"]
    assert len(mine) >= 9  # 5 queries, 4 workers
    assert {about(r) for r in mine} == {("obs", generation, host_id)}
    failed = [r for r in handler.records if r.name == "batchloop" and "failed" in r.getMessage()]
    assert failed and {about(r) for r in failed} == {("obs", generation, host_id)}


class Recorder(observe.Observer):
    def __init__(self) -> None:
        self.events: list[object] = []

    def ownership(self, event: observe.OwnershipEvent) -> None:
        self.events.append(event)

    def wake(self, event: observe.WakeEvent) -> None:
        self.events.append(event)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    unregister = observe.register(r)
    try:
        yield r
    finally:
        unregister()


async def test_a_wake_up_claimed_by_the_dispatcher_is_reported(
    migrated_dsn: str, recorder: Recorder
) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        # The monitor's one tick runs before the name exists: only the wake-up can claim it.
        async with bl.Host(migrated_dsn, modules=["jobs"], monitor_interval=60) as host:
            await insert_and_ping(conn, "w", 3)
            wakes = await wait_for(
                lambda: [e for e in recorder.events if isinstance(e, observe.WakeEvent)]
            )
            host_id = host.host_id
    finally:
        await conn.close()
    (wake,) = wakes
    assert (wake.name, wake.host_id) == ("w", host_id) and wake.seconds >= 0
    claims = [e for e in recorder.events if isinstance(e, observe.OwnershipEvent)]
    assert claims[0].kind == "claim" and (claims[0].name, claims[0].host_id) == ("w", host_id)


FROZEN = "frozenobserve000"


async def test_taking_over_a_frozen_host_is_reported(migrated_dsn: str, recorder: Recorder) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    await insert_and_ping(conn, "f", 3)
    # A host that owns "f" and stopped heartbeating an hour ago, its backend still alive.
    frozen = await asyncpg.connect(
        migrated_dsn, server_settings={"application_name": f"batchloop/{FROZEN}"}
    )
    try:
        await conn.execute(
            "INSERT INTO batchloop.hosts (host_id, hostname, pid, heartbeat_at) "
            "VALUES ($1, 'elsewhere', 1, now() - interval '1 hour')",
            FROZEN,
        )
        await conn.execute(
            "UPDATE batchloop.worker_state SET owner_host = $1 WHERE name = 'f'", FROZEN
        )
        await frozen.execute(
            "SELECT pg_advisory_lock(lock_key) FROM batchloop.workers WHERE name = 'f'"
        )
        async with bl.Host(migrated_dsn, modules=["jobs"], monitor_interval=60) as host:
            host_id = host.host_id
            await wait_for(frozen.is_closed, message="the frozen host's backend was ended")
    finally:
        await frozen.close()
        await conn.close()
    kinds = [
        (e.kind, e.host_id, e.name, e.other_host)
        for e in recorder.events
        if isinstance(e, observe.OwnershipEvent)
    ]
    assert ("takeover", host_id, None, FROZEN) in kinds, kinds
    assert kinds.index(("takeover", host_id, None, FROZEN)) < [k[0] for k in kinds].index("claim")
