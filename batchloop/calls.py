"""Each call users make, described once: what it checks, which named queries it runs with which
arguments, and what their rows mean.

A description is a plan (:mod:`batchloop.plans`), made by calling the function here: making it
validates the arguments, so bad input raises before any connection is touched and any SQL runs;
running it is the executors' part. :mod:`batchloop.api` awaits it on an async driver's session,
:mod:`batchloop.sync` runs it over a psycopg sync connection; neither decides anything.

A new call is one description here plus, in each of api.py and sync.py, a function with the
public signature and docstring whose body hands the description to the executor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar

from . import migrations
from .drivers.base import Row
from .migrations import code_version, refuse_newer
from .models import Config, HostStatus, WorkerStatus
from .plans import Plan, Query
from .registry import resolve_callable, warn_unhostable
from .schema_name import check_name, check_schema
from .status import to_status

T = TypeVar("T")

PingResult = Literal["created", "woken", "updated", "unchanged", "stopped"]
HOST_ALIVE_WITHIN = 60.0
"""A host whose heartbeat is older than this is not alive (the longest heartbeat_interval)."""
_DEFAULT_CONFIG = Config().model_dump_json()


def ping(
    name: str,
    work_query: Callable[..., Any],
    worker: Callable[..., Any],
    config: Config | None,
    schema: str,
) -> Plan[PingResult]:
    args = ping_args(name, work_query, worker, config)
    return _guarded("ping", args, check_schema(schema))


def stop(name: str, schema: str) -> Plan[bool]:
    check_name(name)
    return _found(_guarded("stop", (name, code_version()), check_schema(schema)))


def start(name: str, schema: str) -> Plan[bool]:
    check_name(name)
    return _found(_guarded("start", (name, code_version()), check_schema(schema)))


def wake(name: str, schema: str) -> Plan[bool]:
    check_name(name)
    return _woken(_guarded("wake", (name, code_version()), check_schema(schema)))


def list_hosts(schema: str) -> Plan[list[HostStatus]]:
    return _read("hosts", (HOST_ALIVE_WITHIN,), check_schema(schema), _hosts)


def health(schema: str, max_failures: int, now: datetime) -> Plan[list[str]]:
    """What ``batchloop health`` reports: its problems, one line each (none: healthy)."""
    check_schema(schema)
    readable = yield Query("migrations_readable", (schema,))
    if not (readable and next(iter(readable[0].values()))):
        return [f"schema {schema!r} is missing or unreadable: run `batchloop migrate`"]
    applied = yield Query("applied_migrations", ())
    version = max((int(r["version"]) for r in applied or ()), default=None)
    if version != code_version():
        return [f"schema {schema!r} is at version {version}, this code needs {code_version()}"]
    hosts = _hosts((yield Query("hosts", (HOST_ALIVE_WITHIN,))) or ())
    workers = _statuses((yield Query("status", (None,))) or ())
    return health_problems(hosts, workers, max_failures, now)


def health_problems(
    hosts: Sequence[HostStatus], workers: Sequence[WorkerStatus], max_failures: int, now: datetime
) -> list[str]:
    """The problems in what the database shows. A stale name is one only once it has waited
    longer than its monitor_lag (a host's monitor claims orphans within about that), timed
    from when it was due (next_run_at, else its last work) by ``now``."""
    problems = []
    if not any(h.alive for h in hosts):
        problems.append("no live host: start one with `batchloop run MODULE...`")
    for w in workers:
        if w.consecutive_failures >= max_failures:
            stopped = " (stopped)" if w.state == "stopped" else ""
            error = " ".join((w.last_error or "").split())[:200]
            problems.append(
                f"worker {w.name!r}{stopped}: {w.consecutive_failures} consecutive failures: "
                f"{error}"
            )
        if w.stale:
            since = w.next_run_at or w.last_work_at or w.created_at
            waited = (now - since).total_seconds() if since is not None else float("inf")
            if waited > w.config.monitor_lag:
                problems.append(
                    f"worker {w.name!r}: {w.state} but no host holds it for {waited:.0f} s "
                    f"(monitor_lag {w.config.monitor_lag:g} s): is a host with its callables up?"
                )
        if w.config_error is not None:
            problems.append(f"worker {w.name!r}: stored config invalid: {w.config_error}")
    return problems


def status(name: str, schema: str) -> Plan[WorkerStatus | None]:
    check_name(name)
    return _read("status", (name,), check_schema(schema), _one_status)


def list_workers(schema: str) -> Plan[list[WorkerStatus]]:
    return _read("status", (None,), check_schema(schema), _statuses)


def migrate(schema: str) -> Plan[list[int]]:
    """Inside one transaction, which the executor opens (see :func:`migrations.plan`)."""
    return migrations.plan(check_schema(schema))


# ---------------------------------------------------------------------------- the parts


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


def _guarded(query: str, args: tuple[Any, ...], schema: str) -> Plan[Any]:
    """A call that writes: one query that refuses, by itself, a schema newer than this code."""
    rows = yield Query(query, args)
    return checked(rows[0] if rows else None, schema)


def _found(call: Plan[Any]) -> Plan[bool]:
    result = yield from call
    return bool(result != "missing")


def _woken(call: Plan[Any]) -> Plan[bool]:
    result = yield from call
    return bool(result == "woken")


def _read(
    query: str, args: tuple[Any, ...], schema: str, result: Callable[[Sequence[Row]], T]
) -> Plan[T]:
    """A call that reads: the version check first, whose query raises when schema_version()
    is newer than this code and returns the newest recorded migration, refused here if newer."""
    check = yield Query("check_version", (code_version(),))
    refuse_newer(check[0]["newest"] if check else None, schema)
    return result((yield Query(query, args)) or ())


def _one_status(rows: Sequence[Row]) -> WorkerStatus | None:
    return to_status(rows[0]) if rows else None


def _statuses(rows: Sequence[Row]) -> list[WorkerStatus]:
    return [to_status(r) for r in rows]


def _hosts(rows: Sequence[Row]) -> list[HostStatus]:
    return [
        HostStatus(
            **{k: r[k] for k in ("host_id", "hostname", "pid", "started_at", "heartbeat_at")},
            alive=bool(r["alive"]),
            owned=list(r["owned"] or ()),
        )
        for r in rows
    ]
