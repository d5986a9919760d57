"""The observer seam and its observers (metrics, traces, logs), without a database."""

from __future__ import annotations

import io
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

from batchloop import observe
from batchloop.observe import logs, tracing
from batchloop.observe.metrics import Metrics, serve


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (sample name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider, callables=True)
    try:
        yield exporter
    finally:
        tracing.use(None)


def it(outcome: Any, name: str = "a", seconds: float = 0.01, items: int | None = None) -> Any:
    return observe.IterationEvent(name, 3, "h1", outcome, seconds, items)


# ------------------------------------------------------------------------------ the seam


@dataclass
class Recorder(observe.Observer):
    seen: list[object] = field(default_factory=list)

    def iteration(self, event: observe.IterationEvent) -> None:
        self.seen.append(event)

    def ownership(self, event: observe.OwnershipEvent) -> None:
        self.seen.append(event)


class Broken(observe.Observer):
    def iteration(self, event: observe.IterationEvent) -> None:
        raise RuntimeError("observer bug")


def test_register_delivers_once_and_unregister_stops() -> None:
    rec = Recorder()
    assert not observe.observers
    undo = observe.register(rec)
    observe.register(rec)  # idempotent
    try:
        assert observe.observers == [rec]
        observe.emit_iteration(it("committed"))
        observe.emit_ping(observe.PingEvent("a", "woken", 0.001))  # Observer's no-op default
        observe.emit_ownership(observe.OwnershipEvent("claim", "h1", "a", 3))
    finally:
        undo()
    assert not observe.observers
    observe.emit_iteration(it("failed"))
    assert [type(e).__name__ for e in rec.seen] == ["IterationEvent", "OwnershipEvent"]


def test_a_failing_observer_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Recorder()
    observe.register(Broken())
    observe.register(rec)
    try:
        with caplog.at_level(logging.ERROR, logger="batchloop"):
            observe.emit_iteration(it("committed"))
    finally:
        observe.observers.clear()
    assert len(rec.seen) == 1
    assert "observer" in caplog.text and "observer bug" in caplog.text


# ------------------------------------------------------------------------------ metrics


def test_metrics_series_from_events() -> None:
    m = Metrics()
    m.iteration(it("committed", seconds=0.02, items=100))
    m.iteration(it("committed", seconds=0.03, items=50))
    m.iteration(it("failed", seconds=0.5))
    m.iteration(it("polled"))
    m.iteration(it("committed", name="b", items=None))
    m.ownership(observe.OwnershipEvent("claim", "h1", "a", 3))
    m.ownership(observe.OwnershipEvent("claim", "h1", "b", 1))
    m.ownership(observe.OwnershipEvent("claim", "h2", "a", 4))  # another host in this process
    m.ownership(observe.OwnershipEvent("release", "h1", "a", 3))
    m.ownership(observe.OwnershipEvent("takeover", "h1", other_host="h9"))
    m.wake(observe.WakeEvent("a", "h1", 0.004))
    m.ping(observe.PingEvent("a", "woken", 0.001))
    got = samples(m.text())
    assert got["batchloop_batches_total", (("name", "a"),)] == 2
    assert got["batchloop_batches_total", (("name", "b"),)] == 1
    assert got["batchloop_failures_total", (("name", "a"),)] == 1
    assert got["batchloop_iterations_total", (("name", "a"), ("outcome", "polled"))] == 1
    assert got["batchloop_iteration_seconds_count", (("name", "a"),)] == 3  # not the poll
    assert got["batchloop_iteration_seconds_sum", (("name", "a"),)] == pytest.approx(0.55)
    assert got["batchloop_batch_items_count", (("name", "a"),)] == 2
    assert got["batchloop_batch_items_sum", (("name", "a"),)] == 150
    assert got["batchloop_batch_items_count", (("name", "b"),)] == 0  # unsized batch
    assert got["batchloop_failures_total", (("name", "b"),)] == 0  # a series to alert on
    assert got["batchloop_owned_names", ()] == 2
    assert got["batchloop_ownership_changes_total", (("kind", "claim"),)] == 3
    assert got["batchloop_ownership_changes_total", (("kind", "release"),)] == 1
    assert got["batchloop_takeovers_total", ()] == 1
    assert got["batchloop_wake_seconds_count", ()] == 1
    assert got["batchloop_pings_total", (("result", "woken"),)] == 1


def test_metrics_use_their_own_or_a_given_registry() -> None:
    from prometheus_client import REGISTRY, CollectorRegistry

    Metrics()
    Metrics()  # a second one in the same process: no duplicate-series error
    assert REGISTRY.get_sample_value("batchloop_batches_total", {"name": "a"}) is None
    mine = CollectorRegistry()
    m = Metrics(registry=mine)
    m.iteration(it("committed"))
    assert mine.get_sample_value("batchloop_batches_total", {"name": "a"}) == 1


@dataclass
class FakeHealth:
    ok: bool
    problems: list[str]


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_server_serves_metrics_and_healthz_on_localhost() -> None:
    m = Metrics()
    m.iteration(it("committed"))
    state = FakeHealth(ok=True, problems=[])
    with serve(m, 0, health=lambda: state) as server:
        assert server.host == "127.0.0.1"
        base = f"http://127.0.0.1:{server.port}"
        status, ctype, body = _get(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert samples(body)["batchloop_batches_total", (("name", "a"),)] == 1
        status, _, body = _get(base + "/healthz")
        assert status == 200 and json.loads(body) == {"ok": True, "problems": []}
        state.ok, state.problems = False, ["control connection lost"]
        status, _, body = _get(base + "/healthz")
        assert status == 503 and json.loads(body)["problems"] == ["control connection lost"]
        assert _get(base + "/nope")[0] == 404


def test_healthz_is_503_when_the_check_raises() -> None:
    def broken() -> FakeHealth:
        raise RuntimeError("no host yet")

    with serve(Metrics(), 0, health=broken) as server:
        status, _, body = _get(f"http://127.0.0.1:{server.port}/healthz")
    assert status == 503 and "no host yet" in body


def test_asgi_app_serves_the_registry() -> None:
    import asyncio

    m = Metrics()
    m.iteration(it("committed"))
    app = m.asgi_app()
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
        await app(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert samples(body)["batchloop_batches_total", (("name", "a"),)] == 1


# ------------------------------------------------------------------------------ traces


def test_no_provider_means_shared_noop_context_managers() -> None:
    assert tracing.tracer() is None
    assert tracing.iteration_span("a", 1) is tracing.query_span() is tracing.worker_span()
    with tracing.iteration_span("a", 1) as span:
        tracing.outcome(span, "committed")  # a None span: nothing to do
        assert span is None


def test_callable_spans_are_off_unless_asked_for() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        assert tracing.tracer() is not None
        assert tracing.query_span() is tracing.worker_span()  # the shared no-op
        with tracing.iteration_span("a", 1) as span:
            assert trace.get_current_span() is span  # driver spans nest under the iteration
            with tracing.worker_span():
                assert trace.get_current_span() is span
            tracing.outcome(span, "committed")
    finally:
        tracing.use(None)
    assert [s.name for s in exporter.get_finished_spans()] == ["batchloop.iteration"]


def test_iteration_span_with_children_and_outcome(spans: InMemorySpanExporter) -> None:
    with tracing.iteration_span("a", 7) as span:
        with tracing.query_span():
            pass
        with tracing.worker_span():
            pass
        tracing.outcome(span, "committed")
    with tracing.iteration_span("a", 7) as span:
        tracing.outcome(span, "failed", ValueError("bad batch"))
    with tracing.ping_span("a") as span:
        tracing.ping_result(span, "woken")
    done = {(s.name, s.attributes.get("batchloop.outcome")): s for s in spans.get_finished_spans()}
    parent = done["batchloop.iteration", "committed"]
    assert dict(parent.attributes) == {
        "batchloop.name": "a",
        "batchloop.generation": 7,
        "batchloop.outcome": "committed",
    }
    for child in ("batchloop.work_query", "batchloop.worker"):
        assert done[child, None].parent.span_id == parent.context.span_id
    failed = done["batchloop.iteration", "failed"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.events[0].name == "exception"
    ping = done["batchloop.ping", None]
    assert ping.attributes["batchloop.ping.result"] == "woken"


# ------------------------------------------------------------------------------ logs


def _record_via(handler: logging.Handler, msg: str, **kw: Any) -> None:
    logger = logging.getLogger("test_observe.user")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(msg, **kw)
    finally:
        logger.removeHandler(handler)


def test_context_filter_adds_fields_to_user_records() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(
        logging.Formatter(
            "%(batchloop_name)s/%(batchloop_generation)s/%(batchloop_host)s %(message)s"
        )
    )
    _record_via(handler, "outside")
    outer = logs.enter(host="h1")
    try:
        token = logs.enter("emails", 4)
        try:
            _record_via(handler, "inside")
            _record_via(handler, "explicit", extra={"batchloop_name": "other"})
        finally:
            logs.current.reset(token)
    finally:
        logs.current.reset(outer)
    assert buf.getvalue().splitlines() == [
        "None/None/None outside",
        "emails/4/h1 inside",
        "other/4/h1 explicit",
    ]


def test_batchloop_logger_has_the_filter() -> None:
    assert any(isinstance(f, logs.ContextFilter) for f in logging.getLogger("batchloop").filters)


def test_json_formatter_one_object_per_line() -> None:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    token = logs.enter("emails", 2, "h1")
    try:
        logger = logging.getLogger("test_observe.json")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.warning("sent %d\nmails", 5, extra={"attempt": 3})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        finally:
            logger.removeHandler(handler)
    finally:
        logs.current.reset(token)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "sent 5\nmails" and first["level"] == "WARNING"
    assert first["logger"] == "test_observe.json" and first["attempt"] == 3
    assert (first["batchloop_name"], first["batchloop_generation"], first["batchloop_host"]) == (
        "emails",
        2,
        "h1",
    )
    assert first["time"].endswith("+00:00")
    assert "exc_info" not in first
    assert "ValueError: boom" in second["exc_info"]


def test_the_global_provider_is_looked_up_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.trace import ProxyTracerProvider

    calls: list[int] = []

    def lookup() -> ProxyTracerProvider:
        calls.append(1)
        return ProxyTracerProvider()

    tracing.use(None)
    monkeypatch.setattr(tracing._trace, "get_tracer_provider", lookup)
    for _ in range(100):
        assert tracing.tracer() is None
    assert len(calls) == 1
    monkeypatch.setattr(tracing, "_next_check", 0.0)  # as a second later
    assert tracing.tracer() is None
    assert len(calls) == 2
