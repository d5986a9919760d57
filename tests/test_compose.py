"""docker-compose.yml (no Docker here): its structure, and that what it asks of batchloop and of
the example app exists: PostgreSQL with a TCP healthcheck on a configurable host port, PgBouncer
in transaction mode, two replicas of examples/fastapi_app.py with a direct control DSN."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from batchloop.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
HOST_DEFAULT_GRACE = 10.0


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose["services"]
    assert name in services, f"no service {name!r} in docker-compose.yml"
    return dict(services[name])


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "pgbouncer", "app"}


def test_postgres_healthcheck_is_over_tcp_on_a_configurable_port(compose: dict[str, Any]) -> None:
    pg = _service(compose, "postgres")
    test = pg["healthcheck"]["test"]
    argv = shlex.split(test[1]) if test[0] == "CMD-SHELL" else list(test[1:])
    assert argv[0] == "pg_isready"
    host = argv[argv.index("-h") + 1]
    assert not host.startswith("/"), "a socket directory is not TCP"
    env = _env(pg)
    assert argv[argv.index("-U") + 1] == env["POSTGRES_USER"]
    (ports,) = pg["ports"]
    published, _, target = str(ports).rpartition(":")
    assert target == "5432"
    assert re.fullmatch(r"\$\{BATCHLOOP_PG_PORT:-5432\}", published), published


def test_pgbouncer_pools_transactions_in_front_of_postgres(compose: dict[str, Any]) -> None:
    bouncer = _service(compose, "pgbouncer")
    env = _env(bouncer)
    assert env["POOL_MODE"] == "transaction"
    assert env["DB_HOST"] == "postgres" and env["DB_PORT"] == "5432"
    pg = _env(_service(compose, "postgres"))
    assert (env["DB_USER"], env["DB_PASSWORD"], env["DB_NAME"]) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    assert bouncer["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_app_runs_two_replicas_of_the_fastapi_example(compose: dict[str, Any]) -> None:
    app = _service(compose, "app")
    assert app["deploy"]["replicas"] == 2
    command = app["command"]
    script = command[-1] if isinstance(command, list) else command
    steps = [shlex.split(step) for step in script.split("&&")]
    # the file the app runs exists, relative to the mounted checkout
    (run,) = [s for s in steps if "python" in s]
    target = next(a for a in run if a.endswith(".py"))
    assert (ROOT / target).is_file(), target
    assert target == "examples/fastapi_app.py"
    assert app["working_dir"] == "/src" and any(
        str(v).split(":")[:2] == [".", "/src"] for v in app["volumes"]
    )
    # the extra it installs exists
    (install,) = [s for s in steps if "install" in s]
    requested = re.search(r"\[(\w+)\]", install[-1])
    assert requested is not None
    extras = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    assert re.search(rf"^{requested.group(1)} = \[", extras, re.MULTILINE), requested.group(1)
    # the batchloop commands it runs parse
    (migrate,) = [s for s in steps if s[:1] == ["batchloop"]]
    build_parser().parse_args(migrate[1:])
    # it drains before Docker's SIGKILL
    grace = app["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > HOST_DEFAULT_GRACE


def test_app_dsns_go_through_pgbouncer_with_a_direct_control_connection(
    compose: dict[str, Any],
) -> None:
    app = _service(compose, "app")
    env = _env(app)
    bouncer = _env(_service(compose, "pgbouncer"))
    pooled, direct = urlsplit(env["BATCHLOOP_DSN"]), urlsplit(env["BATCHLOOP_CONTROL_DSN"])
    assert (pooled.hostname, str(pooled.port)) == ("pgbouncer", bouncer["LISTEN_PORT"])
    assert (direct.hostname, direct.port) == ("postgres", 5432)
    assert pooled.path == direct.path == "/" + bouncer["DB_NAME"]
    # the example reads exactly these variables
    source = (ROOT / "examples" / "fastapi_app.py").read_text()
    for var in ("BATCHLOOP_DSN", "BATCHLOOP_CONTROL_DSN", "HOST", "PORT"):
        assert var in env and f'"{var}"' in source, var
    assert env["HOST"] == "0.0.0.0"  # reachable through the published port
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_comment_names_the_dsn_of_the_tests_and_the_app(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    pg = _env(_service(compose, "postgres"))
    user, password, db = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    url = f"DATABASE_URL=postgresql://{user}:{password}@127.0.0.1:${{BATCHLOOP_PG_PORT:-5432}}/{db}"
    assert url in text
    assert "BATCHLOOP_DSN" in text.split("services:")[0]
