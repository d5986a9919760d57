"""The ``batchloop`` command: migrate, print the schema SQL, inspect, stop/start, run a host, tick.

This is a user-facing program, so unlike the library it prints to stdout, installs signal
handlers (``run``) and configures logging. Exit codes: 0 success, 1 error (one line on stderr,
``batchloop: error: ...``, no traceback), 2 usage error, 130 interrupted (Ctrl-C); ``run``
exits 0 on SIGTERM (the normal way to stop a service), ``demo`` 143.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
import time
import traceback
import typing
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import asyncpg
from pydantic import TypeAdapter

from . import calls, sync
from ._version import __version__
from .connect import ConnectError
from .display import format_hosts_table, format_status_table, state_label
from .drivers import _psycopg
from .dsn import DsnError, parse, scrub
from .errors import BatchloopError, SchemaMissingError
from .jobs_cli import add_jobs_command
from .migrations import code_version, schema_script, upgrade_script
from .models import HostStatus, WorkerStatus
from .registry import main_help, main_refs, refs
from .schema_name import DEFAULT_SCHEMA, check_schema

if TYPE_CHECKING:
    import psycopg

PROG = "batchloop"
ERROR = f"{PROG}: error: "
"""The one prefix of every error line (argparse's usage errors included)."""
NO_DSN_HELP = (
    "no DSN given: pass --dsn DSN or set BATCHLOOP_DSN (or DATABASE_URL, or the libpq PG* "
    "variables), e.g. --dsn postgresql://user@localhost/mydb"
)
_STATUSES = TypeAdapter(list[WorkerStatus])
_HOSTS = TypeAdapter(list[HostStatus])

# Errors that mean "the command could not do its job" rather than "batchloop has a bug":
# reported as one line on stderr with exit code 1. (pydantic.ValidationError is a ValueError.)
_EXPECTED: tuple[type[BaseException], ...] = (
    BatchloopError,
    ValueError,
    ImportError,
    *_psycopg.ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


class CommandError(Exception):
    """A command failed for a reason the user can act on; the message says which."""


# ---------------------------------------------------------------------------------- helpers


def resolve_dsn(given: str | None) -> str | None:
    """``--dsn``, else ``BATCHLOOP_DSN``, else ``DATABASE_URL``, else None (libpq ``PG*``)."""
    for value in (given, os.environ.get("BATCHLOOP_DSN"), os.environ.get("DATABASE_URL")):
        if value:
            return value
    return None


def schema_sql(schema: str = DEFAULT_SCHEMA) -> str:
    """The current schema (batchloop/sql/schema.sql) as one script for a database without it,
    recorded as migrated: what ``batchloop sql`` prints (see :func:`migrations.schema_script`)."""
    return schema_script(schema)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _import_user_modules(modules: Sequence[str], verbose: int = 0) -> None:
    """Import MODULEs the way ``python -m`` would find them: the current directory first.

    Whatever a module raises (a syntax error, an exception at import) is one line, or its
    traceback with ``--verbose``; modules that register no callable at all are an error too,
    since a host or tick would then do nothing, silently."""
    import importlib

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for module in modules:
        try:
            importlib.import_module(module)
        except (Exception, SystemExit) as exc:
            if verbose:
                traceback.print_exc()
            kind = "" if isinstance(exc, ImportError) else f"{type(exc).__name__}: "
            raise CommandError(f"cannot import module {module!r}: {kind}{_one_line(exc)}") from exc
    if not refs("work_query") and not refs("worker"):
        raise CommandError(
            f"{', '.join(modules)} registered no work query or worker: decorate module-level "
            "`async def`s with @batchloop.work_query and @batchloop.worker in the module(s) "
            "you name"
        )


# ---------------------------------------------------------------------------------- commands


def cmd_migrate(args: argparse.Namespace) -> int:
    done = sync.migrate(args.dsn, schema=args.schema)
    if done:
        print(f"schema {args.schema!r}: applied migration(s) {', '.join(map(str, done))}")
    else:
        print(f"schema {args.schema!r} is up to date (version {code_version()})")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    if args.from_version is not None:
        sys.stdout.write(upgrade_script(args.schema, args.from_version))
        return 0
    sys.stdout.write(schema_sql(args.schema))
    return 0


def _read_statuses(conn: psycopg.Connection[Any], args: argparse.Namespace) -> list[WorkerStatus]:
    if args.name is None:
        return sync.list_workers(conn, schema=args.schema)
    found = sync.status(conn, args.name, schema=args.schema)
    if found is None:
        raise CommandError(f"no worker named {args.name!r} in schema {args.schema!r}")
    return [found]


def _render(statuses: list[WorkerStatus], args: argparse.Namespace) -> str:
    if args.json:
        if args.name is not None:
            return statuses[0].model_dump_json(indent=2)
        return _STATUSES.dump_json(statuses, indent=2).decode()
    if not statuses:
        return f"no workers in schema {args.schema!r}"
    return format_status_table(statuses) + _main_module_notes(statuses)


def _main_module_notes(statuses: Sequence[WorkerStatus]) -> str:
    """Workers no host can ever run, said under the table: their state alone looks healthy."""
    notes = []
    for s in statuses:
        found = main_refs(s.work_query, s.worker)
        if found and s.state in ("running", "waiting"):
            notes.append(f"\nnote: worker {s.name!r}: {main_help(found)}.")
    return "\n" + "\n".join(notes) if notes else ""


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is None:
        with sync.connect(args.dsn, autocommit=True) as conn:
            print(_render(_read_statuses(conn, args), args))
        return 0
    return _watch(args)


# A database going away (restart, failover, network) is something to wait out while watching.
_WATCH_RETRY: tuple[type[BaseException], ...] = (ConnectError, *_psycopg.OPERATIONAL)


def _watch(args: argparse.Namespace) -> int:
    clear = sys.stdout.isatty() and not args.json
    conn: psycopg.Connection[Any] | None = None
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = sync.connect(args.dsn, autocommit=True)
                text = _render(_read_statuses(conn, args), args)
            except _WATCH_RETRY as exc:
                if conn is not None:
                    conn.close()
                    conn = None
                problem = (
                    f"database unavailable ({scrub(_one_line(exc), args.dsn)}); retrying every "
                    f"{args.watch:g} s"
                )
                if args.json:  # stdout stays JSON documents only
                    print(f"{ERROR}{problem}", file=sys.stderr, flush=True)
                    time.sleep(args.watch)
                    continue
                text = problem
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            stamp = datetime.now().astimezone().strftime("%H:%M:%S")
            if not args.json:
                print(f"batchloop status, schema {args.schema!r}, {stamp} (Ctrl-C to quit)\n")
            print(text, flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 130
    finally:
        if conn is not None:
            conn.close()


def _stop_or_start(args: argparse.Namespace, action: Callable[..., bool], verb: str) -> int:
    with sync.connect(args.dsn, autocommit=True) as conn:
        if not action(conn, args.name, schema=args.schema):
            raise CommandError(f"no worker named {args.name!r} in schema {args.schema!r}")
        now = sync.status(conn, args.name, schema=args.schema)
    state = now.state if now is not None else "?"
    print(f"{verb} {args.name!r} (state: {state})")
    return 0


def cmd_wake(args: argparse.Namespace) -> int:
    with sync.connect(args.dsn, autocommit=True) as conn:
        if not sync.wake(conn, args.name, schema=args.schema):
            now = sync.status(conn, args.name, schema=args.schema)
            if now is None:
                raise CommandError(f"no worker named {args.name!r} in schema {args.schema!r}")
            raise CommandError(
                f"worker {args.name!r} is stopped: `{PROG} start {args.name}` resumes it"
            )
        now = sync.status(conn, args.name, schema=args.schema)
    state = state_label(now) if now is not None else "?"
    print(f"woke {args.name!r} (state: {state})")
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    with sync.connect(args.dsn, autocommit=True) as conn:
        hosts = sync.list_hosts(conn, schema=args.schema)
    if args.json:
        print(_HOSTS.dump_json(hosts, indent=2).decode())
    elif not hosts:
        print(f"no hosts in schema {args.schema!r}")
    else:
        print(format_hosts_table(hosts))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when healthy, 1 with one line per problem on stdout: for probes and cron."""
    try:
        with sync.connect(args.dsn, autocommit=True) as conn:
            problems = sync._run(
                conn,
                args.schema,
                calls.health(args.schema, args.max_failures, datetime.now(timezone.utc)),
            )
    except _EXPECTED as exc:
        problems = [f"database unavailable: {scrub(_explain(exc, args.dsn), args.dsn)}"]
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}, indent=2))
    else:
        print("\n".join(problems) if problems else "ok")
    return 1 if problems else 0


def cmd_stop(args: argparse.Namespace) -> int:
    return _stop_or_start(args, sync.stop, "stopped")


def cmd_start(args: argparse.Namespace) -> int:
    return _stop_or_start(args, sync.start, "started")


async def _run_host(
    dsn: str | None,
    schema: str,
    modules: list[str],
    driver: str,
    metrics_port: int | None = None,
    **host_options: Any,
) -> int:
    """Host until SIGINT (exit code 130) or SIGTERM (0: a service asked to stop)."""
    from .runtime.host import Host

    server = None
    if metrics_port is not None:
        from . import observe
        from .observe.metrics import Metrics, MetricsServer

        # Bound before the host starts, so a port in use fails the command at once.
        metrics = Metrics()
        server = MetricsServer(metrics, metrics_port)
        observe.register(metrics)

    done = asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()
    installed = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on this platform
            pass
    try:
        async with Host(
            dsn,
            modules=modules,
            schema=schema,
            driver=driver,  # type: ignore[arg-type]
            **host_options,
        ) as host:
            serving = ""
            if server is not None:
                # /healthz answers from Host.health() where the host has it; else 200 while up.
                server.health = getattr(host, "health", None)
                server.start()
                serving = f"; metrics at http://{server.host}:{server.port}/metrics"
            print(
                f"batchloop host {host.host_id} (pid {host.pid}) running {', '.join(modules)} "
                f"in schema {schema!r}{serving}; Ctrl-C or SIGTERM to stop",
                flush=True,
            )
            await done.wait()
            print("stopping: letting in-flight batches finish...", flush=True)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if server is not None:
            server.close()
    print("stopped", flush=True)
    return 130 if received and received[0] == signal.SIGINT else 0


def cmd_run(args: argparse.Namespace) -> int:
    _import_user_modules(args.modules, args.verbose)
    return asyncio.run(
        _run_host(
            args.dsn,
            args.schema,
            list(args.modules),
            args.driver,
            args.metrics_port,
            **_host_options(args),
        )
    )


def _host_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run``'s Host settings given on the command line (or by BATCHLOOP_* variables); the
    rest keep Host's defaults."""
    given = {
        "control_dsn": args.control_dsn,
        "pool_max_size": args.pool_max_size,
        "shutdown_grace": args.shutdown_grace,
        "startup_timeout": args.startup_timeout,
    }
    return {key: value for key, value in given.items() if value is not None}


def cmd_web(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .web import create_app
    except ImportError as exc:
        raise CommandError(
            f"batchloop web needs the 'web' extra ({_one_line(exc)}): pip install 'batchloop[web]'"
        ) from exc
    app = create_app(args.dsn, token=args.token, schema=args.schema)
    mode = "actions need the token" if args.token else "read-only (no --token)"
    print(f"batchloop status page on http://{args.host}:{args.port}/ ({mode})", flush=True)
    # uvicorn handles SIGINT/SIGTERM itself and returns once it has shut down.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_tick(args: argparse.Namespace) -> int:
    from .runtime.tick import tick

    _import_user_modules(args.modules, args.verbose)
    names = list(args.names) if args.names else None
    report = asyncio.run(tick(args.dsn, names, budget=args.budget, schema=args.schema))
    print(report.model_dump_json(indent=2))
    for failure in report.failed:
        print(f"{ERROR}{failure.name!r}: {_one_line(Exception(failure.error))}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run as run_demo

    return run_demo(
        args.dsn,
        schema=args.schema,
        events=args.events,
        producers=args.producers,
        batch=args.batch,
        chunk=args.chunk,
    )


# ---------------------------------------------------------------------------------- parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0: {text!r}")
    return value


def _version_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a schema version number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a schema version is 0 or more: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535: {text!r}")
    return value


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The same options on the main parser and, defaulting to "not given", on each subcommand,
    so that both ``batchloop --dsn X status`` and ``batchloop status --dsn X`` work."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--dsn",
        default=default(None),
        help="PostgreSQL DSN (default: $BATCHLOOP_DSN, else $DATABASE_URL, else the libpq PG* "
        "variables)",
    )
    parser.add_argument(
        "--schema",
        default=default(DEFAULT_SCHEMA),
        help=f"schema of batchloop's tables (default: {DEFAULT_SCHEMA})",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log more (-v: info, -vv: debug)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default("text"),
        help="log lines as text, or as one JSON object per line with the batchloop_name, "
        "batchloop_generation and batchloop_host fields (default text)",
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """Usage errors with the same prefix as every other error (argparse would put the
        subcommand's name in it), then exit 2."""
        self.print_usage(sys.stderr)
        self.exit(2, f"{ERROR}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="One loop per named queue, cluster-wide, over PostgreSQL.",
    )
    _global_options(parser, suppress=False)
    parser.epilog = ENV_HELP
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    add("migrate", cmd_migrate, "create or upgrade the batchloop schema (idempotent)")
    p = add(
        "sql",
        cmd_sql,
        "print the current schema (batchloop/sql/schema.sql) as one script for a database "
        "without it; migrate makes the same schema from the migrations",
    )
    _sql_from_option(p)

    p = add("status", cmd_status, "show workers: all of them, or NAME")
    p.add_argument("name", nargs="?", metavar="NAME", help="one worker's name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--watch",
        nargs="?",
        type=_positive_float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )

    p = add("wake", cmd_wake, "run worker NAME now: clears a failure backoff or a debounce")
    p.add_argument("name", metavar="NAME")
    p = add("hosts", cmd_hosts, "show the hosts: alive or not, and the names each runs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = add(
        "health",
        cmd_health,
        "exit 0 when healthy, else 1 with one line per problem: the database answers, the "
        "schema is current, a live host exists, no worker failing or waiting for a host",
    )
    p.add_argument(
        "--max-failures",
        type=_positive_int,
        default=1,
        metavar="K",
        help="a worker with K or more consecutive failures is a problem (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")

    p = add("stop", cmd_stop, "stop worker NAME: no more batches, pings ignored")
    p.add_argument("name", metavar="NAME")
    p = add("start", cmd_start, "resume the stopped worker NAME")
    p.add_argument("name", metavar="NAME")

    p = add("run", cmd_run, "run a host for the callables registered by MODULE(s) until Ctrl-C")
    p.add_argument("modules", nargs="+", metavar="MODULE", help="e.g. myapp.jobs")
    p.add_argument(
        "--driver",
        choices=("asyncpg", "psycopg"),
        default="asyncpg",
        help="the connections your callables get (default asyncpg)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics and /healthz "
        "(pip install 'batchloop[metrics]')",
    )

    _run_ops_options(p)

    p = add("tick", cmd_tick, "one bounded drain pass (for cron); prints a JSON report")
    p.add_argument("modules", nargs="+", metavar="MODULE", help="e.g. myapp.jobs")
    p.add_argument(
        "--name",
        dest="names",
        action="append",
        metavar="N",
        help="drain only this worker (repeatable; default: every worker that has work)",
    )
    p.add_argument(
        "--budget",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="stop starting new batches after SECONDS (default 10)",
    )

    p = add(
        "demo",
        cmd_demo,
        "producers insert events and ping while a host drains them; with no DSN at all, on an "
        "embedded PostgreSQL (pip install 'batchloop[embedded]'). Creates (replaces) tables "
        "demo_events and demo_totals.",
    )
    p.add_argument("--events", type=_positive_int, default=100_000, help="default 100000")
    p.add_argument("--producers", type=_positive_int, default=4, help="default 4")
    p.add_argument("--batch", type=_positive_int, default=100, help="batch size (default 100)")
    p.add_argument(
        "--chunk",
        type=_positive_int,
        default=20,
        help="average events per producer transaction (default 20)",
    )
    _add_web_command(add)
    add_jobs_command(add, common, _Parser)
    return parser


ENV_HELP = (
    "Every option can also be set by an environment variable: BATCHLOOP_ and the option's "
    "long name in capitals with - as _ (--schema: BATCHLOOP_SCHEMA, --pool-max-size: "
    "BATCHLOOP_POOL_MAX_SIZE; flags take 1/0, true/false, yes/no). The command line wins; "
    "--dsn falls back to BATCHLOOP_DSN, then DATABASE_URL."
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _run_ops_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--control-dsn",
        default=None,
        metavar="DSN",
        help="a direct (not pooled) DSN for the host's control connection, when --dsn goes "
        "through a transaction pooler such as PgBouncer",
    )
    p.add_argument(
        "--pool-max-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="connections in the host's pool for callables (default 10)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=_non_negative_float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight batches may take to finish (default 10); give "
        "the service manager's stop timeout a margin over it",
    )
    p.add_argument(
        "--startup-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="give up starting when the database does not answer in SECONDS (default 30)",
    )


def _sql_from_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="from_version",
        type=_version_number,
        default=None,
        metavar="N",
        help="print instead the upgrade from schema version N to this batchloop's (for "
        "Alembic, Flyway, Django RunSQL); 0 means an empty database",
    )


def _add_web_command(add: Callable[..., Any]) -> None:
    p = add(
        "web",
        cmd_web,
        "serve a live status page of every worker and host (extra 'web'); read-only unless "
        "--token is given",
    )
    p.add_argument("--port", type=_port, default=8080, help="default 8080")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--token",
        default=None,
        help="enables stop/start/wake for requests with 'Authorization: Bearer TOKEN' (the "
        "page has a form for it); prefer BATCHLOOP_TOKEN, which ps does not show",
    )


def _apply_environment(
    parser: argparse.ArgumentParser, command: str, nested: str | None = None
) -> None:
    """Defaults from BATCHLOOP_* variables for the main options and ``command``'s (only that
    one's: a variable meant for another command is no error here), and its ``nested``
    subcommand's (``jobs list``). A bad value is a usage error naming the variable."""
    sub = _subcommands(parser).get(command)
    inner = _subcommands(sub).get(nested) if sub is not None and nested else None
    for owner in (parser, sub, inner):
        if owner is None:
            continue
        for action in owner._actions:
            if action.default is argparse.SUPPRESS or action.dest in ("dsn", "help", "version"):
                continue  # subcommand copies of the main options; dsn has its own rule
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs:
                continue
            var = "BATCHLOOP_" + longs[0][2:].upper().replace("-", "_")
            if var not in os.environ:
                continue
            action.default = _env_value(owner, action, var, os.environ[var])


def _env_value(
    parser: argparse.ArgumentParser, action: argparse.Action, var: str, text: str
) -> Any:
    def fail(why: str) -> typing.NoReturn:
        parser.error(f"environment variable {var}={text!r}: {why}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if text.strip().lower() not in _TRUE | _FALSE:
            fail("expected 1/0, true/false or yes/no")
        value = text.strip().lower() in _TRUE
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._CountAction):
        try:
            return int(text)
        except ValueError:
            fail("expected a number")
    convert: Callable[[str], Any] = action.type if callable(action.type) else str
    items = (
        [t.strip() for t in text.split(",") if t.strip()]
        if isinstance(action, argparse._AppendAction)
        else [text]
    )
    values = []
    for item in items:
        try:
            value = convert(item)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            fail(str(exc) or "invalid value")
        if action.choices is not None and value not in action.choices:
            fail(f"choose from {', '.join(map(str, action.choices))}")
        values.append(value)
    return values if isinstance(action, argparse._AppendAction) else values[0]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _configure_logging(verbose: int, command: str, log_format: str = "text") -> None:
    base = logging.INFO if command == "run" else logging.WARNING
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else base
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from .observe.logs import ContextFilter, JsonFormatter

        handler.setFormatter(JsonFormatter())
        # On the handler, not a logger: the user's own records (inside callables) carry the
        # batchloop_* fields too.
        handler.addFilter(ContextFilter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.WARNING,  # other libraries
        handlers=[handler],
    )
    logging.getLogger("batchloop").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # Again with BATCHLOOP_* defaults for that command: the first pass only finds which.
        _apply_environment(parser, args.command, getattr(args, "jobs_command", None))
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    _configure_logging(args.verbose, args.command, args.log_format)
    args.dsn = resolve_dsn(args.dsn)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        check_schema(args.schema)
        return handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except CommandError as exc:
        print(f"{ERROR}{scrub(_one_line(exc), args.dsn)}", file=sys.stderr)
        return 1
    except _EXPECTED as exc:
        if args.verbose >= 2:
            logging.getLogger("batchloop").exception("%s failed", args.command)
        print(f"{ERROR}{scrub(_explain(exc, args.dsn), args.dsn)}", file=sys.stderr)
        return 1


def _explain(exc: BaseException, dsn: str | None) -> str:
    """The error's line, with what the user needs to act on it."""
    text = _one_line(exc)
    if isinstance(exc, ConnectError) and not dsn:
        return f"{text}; {NO_DSN_HELP}"
    if isinstance(exc, SchemaMissingError):
        return f"{text} (database {_database_of(dsn)!r})"
    return text


def _database_of(dsn: str | None) -> str:
    """The database libpq connects to for ``dsn``: its dbname, else PGDATABASE, else the user."""
    try:
        params = parse(dsn or "")
    except DsnError:
        params = {}
    return (
        params.get("dbname")
        or os.environ.get("PGDATABASE")
        or params.get("user")
        or os.environ.get("PGUSER")
        or getpass.getuser()
    )


__all__ = ["build_parser", "format_status_table", "main", "resolve_dsn", "schema_sql"]
