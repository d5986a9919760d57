"""examples/deploy: the Kubernetes manifest and the systemd unit are valid, and what they ask of
the CLI (commands, options, variables) exists, with stop timeouts above the shutdown grace."""

from __future__ import annotations

import argparse
import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchloop.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "examples" / "deploy" / "batchloop.yaml"
UNIT = ROOT / "examples" / "deploy" / "batchloop.service"
MARGIN = 5.0
"""Seconds beyond shutdown_grace for closing connections and exiting, before SIGKILL."""
HOST_DEFAULT_GRACE = 10.0


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(found) == 1
    return dict(found[0].choices)


def _check_command(argv: list[str]) -> Any:
    """Parse a command as the CLI would; a missing subcommand (added on another branch) skips."""
    assert Path(argv[0]).name == "batchloop", argv
    parser = build_parser()
    if argv[1] not in _subcommands(parser):
        pytest.skip(f"`batchloop {argv[1]}` is not in this branch yet (issue 11, helper steer)")
    try:
        return parser.parse_args(argv[1:])
    except SystemExit as exc:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"the CLI rejects {shlex.join(argv)}") from exc


def _env_option(name: str, command: str) -> str:
    """BATCHLOOP_X must name an option of ``command`` (or a main option): a typo does nothing."""
    assert name.startswith("BATCHLOOP_"), name
    if name == "BATCHLOOP_DSN":
        return "--dsn"
    option = "--" + name.removeprefix("BATCHLOOP_").lower().replace("_", "-")
    parser = build_parser()
    known = {o for a in _subcommands(parser)[command]._actions for o in a.option_strings}
    assert option in known, f"{name}: `batchloop {command}` has no {option}"
    return option


def _grace(env: dict[str, str], args: list[str]) -> float:
    parsed = build_parser().parse_args(args)
    if parsed.shutdown_grace is not None:
        return float(parsed.shutdown_grace)
    return float(env.get("BATCHLOOP_SHUTDOWN_GRACE", HOST_DEFAULT_GRACE))


# ------------------------------------------------------------------------------ Kubernetes


def _documents() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _deployment() -> dict[str, Any]:
    found = [d for d in _documents() if d["kind"] == "Deployment"]
    assert len(found) == 1
    return found[0]


def _host_container() -> tuple[dict[str, Any], dict[str, Any]]:
    spec = _deployment()["spec"]["template"]["spec"]
    return spec, next(c for c in spec["containers"] if c["command"][1] == "run")


def test_manifest_commands_parse() -> None:
    docs = _documents()
    assert {d["kind"] for d in docs} == {"Job", "Deployment"}
    job = next(d for d in docs if d["kind"] == "Job")
    _check_command(job["spec"]["template"]["spec"]["containers"][0]["command"])
    _, host = _host_container()
    _check_command(host["command"])
    for var in host["env"]:
        _env_option(var["name"], "run")


def test_manifest_grace_period_exceeds_shutdown_grace() -> None:
    spec, host = _host_container()
    env = {v["name"]: v["value"] for v in host["env"] if "value" in v}
    grace = _grace(env, host["command"][1:])
    assert spec["terminationGracePeriodSeconds"] >= grace + MARGIN, (grace, spec)


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_manifest_probes_run_batchloop_health(probe: str) -> None:
    _, host = _host_container()
    command = host[probe]["exec"]["command"]
    assert command[1] == "health", command
    _check_command(command)
    assert host[probe]["timeoutSeconds"] >= 5  # health connects to the database


def test_manifest_every_replica_uses_one_role() -> None:
    _, host = _host_container()
    dsn = next(v for v in host["env"] if v["name"] == "BATCHLOOP_DSN")
    assert "secretKeyRef" in dsn["valueFrom"]  # one secret, hence one role, for the replicas


# ------------------------------------------------------------------------------ systemd


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _seconds(text: str) -> float:
    text = text.strip()
    for suffix, factor in (("min", 60.0), ("ms", 0.001), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_unit_is_consistent_with_the_cli() -> None:
    unit = _unit()
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    _check_command(argv)
    env = dict(item.split("=", 1) for item in shlex.split(service.get("Environment", "")))
    for name in env:
        _env_option(name, "run")
    grace = _grace(env, argv[1:])
    assert _seconds(service["TimeoutStopSec"]) >= grace + MARGIN
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"  # SIGTERM exits 0: a stop is not restarted
    assert set(unit.sections()) == {"Unit", "Service", "Install"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this environment's batchloop.
    here = Path(sys.executable).parent / "batchloop"
    text = UNIT.read_text().replace("/opt/myapp/venv/bin/batchloop", str(here))
    copy = tmp_path / "batchloop.service"
    copy.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    problems = [ln for ln in proc.stderr.splitlines() if "batchloop.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stderr
