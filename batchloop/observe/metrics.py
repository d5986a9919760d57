"""Prometheus metrics of the loops in this process (extra ``metrics``: prometheus-client).

    from batchloop import observe
    from batchloop.observe.metrics import Metrics, serve

    metrics = Metrics()                 # its own CollectorRegistry (or Metrics(registry=...))
    observe.register(metrics)
    app.mount("/metrics", metrics.asgi_app())        # in an ASGI service, or:
    with serve(metrics, port=9464, health=host.health): ...   # /metrics and /healthz

``batchloop run --metrics-port PORT`` does the latter next to its host.

Series (``name`` is the worker's name):

* ``batchloop_batches_total{name}``: batches committed.
* ``batchloop_failures_total{name}``: iterations that failed (rolled back, retried).
* ``batchloop_iteration_seconds{name}``: histogram of committed and failed iterations' time.
* ``batchloop_iterations_total{name,outcome}``: every iteration, by outcome (committed, failed,
  idle, waiting, polled, superseded, unrunnable).
* ``batchloop_batch_items{name}``: histogram of items per committed batch (sized batches only).
* ``batchloop_owned_names``: names the hosts of this process run right now.
* ``batchloop_ownership_changes_total{kind}``: claims and releases of names by this process.
* ``batchloop_takeovers_total``: frozen hosts this process ended to take their names over.
* ``batchloop_wake_seconds``: histogram from a wake-up's arrival at a host to its loop claimed.
* ``batchloop_pings_total{result}``: pings made from this process, by result.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

try:
    import prometheus_client as prom
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "batchloop metrics need prometheus-client: pip install 'batchloop[metrics]'"
    ) from exc

from . import IterationEvent, Observer, OwnershipEvent, PingEvent, WakeEvent

log = logging.getLogger("batchloop")

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITEMS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
WAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics(Observer):
    """An observer that keeps the series above in ``registry`` (default: a new one of its own,
    so that several can coexist and the process's default registry is left alone)."""

    def __init__(self, registry: prom.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        r = self.registry
        self.batches = prom.Counter("batchloop_batches", "Batches committed", ["name"], registry=r)
        self.failures = prom.Counter(
            "batchloop_failures",
            "Iterations that failed and were rolled back",
            ["name"],
            registry=r,
        )
        self.iterations = prom.Counter(
            "batchloop_iterations", "Iterations by outcome", ["name", "outcome"], registry=r
        )
        self.iteration_seconds = prom.Histogram(
            "batchloop_iteration_seconds",
            "Time of committed and failed iterations (transaction and callables)",
            ["name"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_items = prom.Histogram(
            "batchloop_batch_items",
            "Items per committed batch (sized batches only)",
            ["name"],
            buckets=ITEMS_BUCKETS,
            registry=r,
        )
        self.owned_names = prom.Gauge(
            "batchloop_owned_names", "Names the hosts of this process run now", registry=r
        )
        self.ownership_changes = prom.Counter(
            "batchloop_ownership_changes", "Names claimed or released", ["kind"], registry=r
        )
        self.takeovers = prom.Counter(
            "batchloop_takeovers", "Frozen hosts ended to take their names over", registry=r
        )
        self.wake_seconds = prom.Histogram(
            "batchloop_wake_seconds",
            "From a wake-up's arrival at the host to its name's loop claimed",
            buckets=WAKE_BUCKETS,
            registry=r,
        )
        self.pings = prom.Counter(
            "batchloop_pings", "Pings made from this process", ["result"], registry=r
        )
        self._per_name: dict[str, tuple[Any, Any, Any, Any]] = {}
        """Each name's labelled children (batches, failures, seconds, items): ``labels()``
        takes a lock and builds a key on every call, and this runs once per iteration."""
        self._per_outcome: dict[tuple[str, str], Any] = {}
        """``iterations`` by (name, outcome), for the same reason."""
        self._owned: set[tuple[str | None, str]] = set()
        self._lock = threading.Lock()

    # ---- the observer

    def iteration(self, event: IterationEvent) -> None:
        name, outcome = event.name, event.outcome
        children = self._per_name.get(name)
        if children is None:
            children = self._per_name[name] = (
                self.batches.labels(name),
                self.failures.labels(name),
                self.iteration_seconds.labels(name),
                self.batch_items.labels(name),
            )
        batches, failures, seconds, items = children
        counted = self._per_outcome.get((name, outcome))
        if counted is None:
            counted = self._per_outcome[name, outcome] = self.iterations.labels(name, outcome)
        counted.inc()
        if outcome == "committed":
            batches.inc()
            seconds.observe(event.seconds)
            if event.items is not None:
                items.observe(event.items)
        elif outcome == "failed":
            failures.inc()
            seconds.observe(event.seconds)

    def ownership(self, event: OwnershipEvent) -> None:
        if event.kind == "takeover":
            self.takeovers.inc()
            return
        if event.name is None:
            return
        self.ownership_changes.labels(event.kind).inc()
        key = (event.host_id, event.name)
        with self._lock:
            if event.kind == "claim":
                self._owned.add(key)
            else:
                self._owned.discard(key)
            self.owned_names.set(len(self._owned))

    def wake(self, event: WakeEvent) -> None:
        self.wake_seconds.observe(event.seconds)

    def ping(self, event: PingEvent) -> None:
        self.pings.labels(event.result).inc()

    # ---- exposition

    def text(self) -> str:
        """The registry in Prometheus text format."""
        return prom.generate_latest(self.registry).decode()

    def asgi_app(self) -> Any:
        """An ASGI app serving the registry (mount it at ``/metrics``)."""
        return prom.make_asgi_app(registry=self.registry)


HealthCheck = Callable[[], Any]
"""A zero-argument callable returning an object with ``.ok`` (such as ``Host.health``)."""


def _health_body(check: HealthCheck | None) -> tuple[int, bytes]:
    if check is None:
        return 200, b'{"ok": true}\n'
    try:
        health = check()
    except Exception as exc:
        log.exception("batchloop /healthz: the health check failed")
        return 503, json.dumps({"ok": False, "problems": [f"health check failed: {exc}"]}).encode()
    if hasattr(health, "model_dump"):  # pydantic
        data = health.model_dump(mode="json")
    elif hasattr(health, "__dict__"):
        data = dict(vars(health))
    else:
        data = {"ok": bool(getattr(health, "ok", False))}
    return (200 if health.ok else 503), (json.dumps(data, default=str) + "\n").encode()


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP on a daemon thread (as prometheus-client's own
    server does: a scrape is answered even while the event loop is busy)."""

    def __init__(
        self,
        metrics: Metrics,
        port: int,
        *,
        host: str = "127.0.0.1",
        health: HealthCheck | None = None,
    ) -> None:
        self.metrics = metrics
        self.health = health
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, body = 200, outer.metrics.text().encode()
                    ctype = prom.CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    status, body = _health_body(outer.health)
                    ctype = "application/json"
                else:
                    status, ctype = 404, "text/plain"
                    body = b"not found: try /metrics or /healthz\n"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics server: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        address = self._server.server_address
        self.host: str = address[0] if isinstance(address[0], str) else address[0].decode()
        self.port: int = int(address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="batchloop-metrics", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@contextmanager
def serve(
    metrics: Metrics,
    port: int,
    *,
    host: str = "127.0.0.1",
    health: HealthCheck | None = None,
) -> Iterator[MetricsServer]:
    """Serve ``metrics`` at ``http://HOST:PORT/metrics`` and ``health`` at ``/healthz`` (200
    when its result's ``ok``, else 503; the result as JSON) while the block runs. ``port`` 0
    picks a free port (see ``.port``)."""
    server = MetricsServer(metrics, port, host=host, health=health).start()
    try:
        yield server
    finally:
        server.close()


__all__ = ["HealthCheck", "Metrics", "MetricsServer", "serve"]
