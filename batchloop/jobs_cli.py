"""``batchloop jobs list|show|cancel|retry``: inspect and steer :mod:`batchloop.jobs` from a shell.

Wired into :mod:`batchloop.cli` (which owns the conventions: ``--dsn`` and ``BATCHLOOP_*``,
one ``batchloop: error: ...`` line and exit 1 when a command cannot do its job, 2 for usage).
It only reads and updates job rows through the public ``batchloop.jobs`` functions: no job type
named by a row is ever imported, so it needs none of the application's modules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .display import _clip, _table, printable, relative
from .errors import BatchloopError

if TYPE_CHECKING:
    from .jobs import JobRun

STATUSES = ("pending", "running", "completed", "failed", "canceled")
FINAL = ("completed", "failed", "canceled")
CONNECT_TIMEOUT = 10.0
MAX_ID = 2**63 - 1


class JobsCommandError(BatchloopError):
    """A jobs command could not do what was asked; the message says why (exit 1)."""


def _job_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a job id is a whole number: {text!r}") from None
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"a job id is 1 or more (a bigint): {text!r}")
    return value


def add_jobs_command(
    add: Callable[..., Any], common: argparse.ArgumentParser, parser_class: type[Any]
) -> None:
    """Adds ``jobs`` and its four subcommands through cli.py's ``add`` helper; each subcommand
    takes the main options too (``batchloop jobs list --dsn X`` works like ``batchloop --dsn X
    jobs list``)."""
    # cli.py imports this module to build its parser: its argument types are there by now.
    from .cli import _positive_int

    p = add("jobs", cmd_jobs, "list, show, cancel or retry background jobs (batchloop.jobs)")
    sub = p.add_subparsers(
        dest="jobs_command", required=True, metavar="SUBCOMMAND", parser_class=parser_class
    )

    def child(name: str, help: str) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = sub.add_parser(
            name, parents=[common], help=help, description=help
        )
        return c

    c = child("list", "list jobs, newest first, optionally filtered")
    c.add_argument("--queue", default=None, metavar="Q", help="only jobs of queue Q")
    c.add_argument("--status", default=None, choices=STATUSES, help="only jobs in this status")
    c.add_argument("--type", default=None, metavar="T", help="only jobs of type T")
    c.add_argument(
        "--limit", type=_positive_int, default=100, metavar="N", help="at most N jobs (default 100)"
    )
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c = child("show", "show one job: status, attempts, progress, payload, result, error")
    c.add_argument("id", type=_job_id, metavar="ID")
    c.add_argument("--json", action="store_true", help="print JSON instead of lines")
    c = child(
        "cancel",
        "cancel job ID: a pending job never runs; a running one sees ctx.cancelled() and ends "
        "canceled",
    )
    c.add_argument("id", type=_job_id, metavar="ID")
    c = child("retry", "put the failed or canceled job ID back to pending (attempts reset)")
    c.add_argument("id", type=_job_id, metavar="ID")


def cmd_jobs(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from . import jobs
    from .connect import connect

    conn = await connect(args.dsn, timeout=CONNECT_TIMEOUT)
    try:
        command = args.jobs_command
        if command == "list":
            found = await jobs.list_jobs(
                conn,
                queue=args.queue,
                type=args.type,
                status=args.status,
                limit=args.limit,
                schema=args.schema,
            )
            print(_render_list(found, args.json))
            return 0
        run = await jobs.get(conn, args.id, schema=args.schema)
        if run is None:
            raise JobsCommandError(f"no job with id {args.id} in schema {args.schema!r}")
        if command == "show":
            print(run.model_dump_json(indent=2) if args.json else format_job(run))
            return 0
        if command == "cancel":
            if not await jobs.cancel(conn, args.id, schema=args.schema):
                now = await jobs.get(conn, args.id, schema=args.schema)
                status = now.status if now is not None else "deleted"
                raise JobsCommandError(f"job {args.id} is already {status}: nothing to cancel")
            now = await jobs.get(conn, args.id, schema=args.schema)
            print(_cancel_line(args.id, now))
            return 0
        if command == "retry":
            if not await jobs.retry(conn, args.id, schema=args.schema):
                now = await jobs.get(conn, args.id, schema=args.schema)
                status = now.status if now is not None else "deleted"
                raise JobsCommandError(
                    f"job {args.id} is {status}: only a failed or canceled job can be retried"
                )
            now = await jobs.get(conn, args.id, schema=args.schema)
            state = now.status if now is not None else "?"
            print(f"retrying job {args.id} (status: {state})")
            return 0
        raise AssertionError(f"unknown jobs command {command!r}")  # pragma: no cover
    finally:
        await conn.close()


def _cancel_line(job_id: int, now: JobRun | None) -> str:
    if now is None or now.status == "canceled":
        return f"canceled job {job_id} (status: canceled)"
    if now.status == "running":
        return (
            f"cancel requested for job {job_id} (status: running): its handler sees "
            "ctx.cancelled(), and the job ends canceled"
        )
    # A pending job whose type has an on_complete this process cannot call: the queue's loop
    # records the cancel (and calls it); the job never runs meanwhile.
    return (
        f"cancel requested for job {job_id} (status: {now.status}): it will not run; its "
        "queue's loop records it as canceled"
    )


def _status(run: JobRun) -> str:
    if run.cancel_requested and run.status in ("pending", "running"):
        return f"{run.status} (cancel requested)"
    return run.status


def _render_list(found: Sequence[JobRun], as_json: bool) -> str:
    if as_json:
        return json.dumps([r.model_dump(mode="json") for r in found], indent=2)
    if not found:
        return "no jobs"
    return format_jobs_table(found)


def _attempts(run: JobRun) -> str:
    return f"{run.attempts}/{run.max_attempts}"


def _error_line(error: str | None, width: int) -> str:
    return _clip(printable(" ".join(error.split())), width) if error else "-"


def format_jobs_table(found: Sequence[JobRun], now: datetime | None = None) -> str:
    """A fixed-width table of jobs (``batchloop jobs list``); times relative to ``now``."""
    now = now if now is not None else datetime.now(timezone.utc)
    rows = [("ID", "TYPE", "QUEUE", "STATUS", "TRIES", "PROGRESS", "CREATED", "RUN AT", "ERROR")]
    for r in found:
        rows.append(
            (
                str(r.id),
                _clip(printable(r.type), 30),
                _clip(printable(r.queue), 30),
                _status(r),
                _attempts(r),
                f"{r.progress}%",
                relative(r.created_at, now),
                relative(r.run_at, now) if r.status == "pending" else "-",
                _error_line(r.error, 40),
            )
        )
    return _table(rows, right={0, 4, 5})


def format_job(run: JobRun, now: datetime | None = None) -> str:
    """One job as ``field: value`` lines (``batchloop jobs show``)."""
    now = now if now is not None else datetime.now(timezone.utc)

    def when(value: datetime | None) -> str:
        if value is None:
            return "-"
        return f"{value.isoformat(timespec='seconds')} ({relative(value, now)})"

    def as_json(value: Any) -> str:
        return "-" if value is None else printable(json.dumps(value, sort_keys=True, default=str))

    lines = [
        ("id", str(run.id)),
        ("type", printable(run.type)),
        ("queue", printable(run.queue)),
        ("status", _status(run)),
        ("progress", f"{run.progress}%"),
        ("attempts", _attempts(run)),
        ("key", printable(run.key) if run.key is not None else "-"),
        ("created", when(run.created_at)),
        ("run at", when(run.run_at)),
        ("started", when(run.started_at)),
        ("completed", when(run.completed_at)),
        ("payload", as_json(run.payload)),
        ("result", as_json(run.result)),
    ]
    width = max(len(k) for k, _ in lines) + 1
    out = [f"{(k + ':').ljust(width)} {v}" for k, v in lines]
    if run.error:
        # The whole error (a traceback's last lines, say), indented under its label.
        out.append("error:")
        out.extend("  " + printable(line) for line in run.error.splitlines())
    else:
        out.append(f"{'error:'.ljust(width)} -")
    return "\n".join(out)
