"""``batchloop run --metrics-port`` and ``--log-format json``, in a real subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import observe_jobs
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from test_cli import TESTS, Lines, _env

import batchloop.sync as bls

from jobs import TABLES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _batches(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "batchloop_batches_total" and s.labels == {"name": name}:
                return s.value
    return 0.0


def test_run_serves_metrics_and_logs_json_lines(migrated_dsn: str) -> None:
    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        conn.execute(TABLES)
    port = _free_port()
    argv = ["--log-format", "json", "-vv", "--dsn", migrated_dsn, "run", "observe_jobs"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchloop", *argv, "--metrics-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=TESTS,
    )
    try:
        lines = Lines(proc)
        started = "".join(lines.wait_for("running"))
        assert f"http://127.0.0.1:{port}/metrics" in started
        with psycopg.connect(migrated_dsn) as conn:
            conn.execute("INSERT INTO items (name) SELECT 'cli' FROM generate_series(1, 15)")
            bls.ping(conn, "cli", observe_jobs.take, observe_jobs.put)
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            status, text = _get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            if _batches(text, "cli") >= 2:
                break
            time.sleep(0.05)
        assert _batches(text, "cli") == 2, text
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and json.loads(body)["ok"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records, "no log lines at all"
    for record in records:
        assert {"time", "level", "logger", "message", "batchloop_name"} <= record.keys()
    mine = [r for r in records if r["logger"] == "observe_jobs"]
    assert mine and all(r["batchloop_name"] == "cli" for r in mine)
    assert all(r["batchloop_host"] and r["batchloop_generation"] for r in mine)
    # batchloop's own records: the host's name its host, the loop's its name too
    assert any(r["logger"] == "batchloop" and r["batchloop_host"] for r in records)
    assert any(r["logger"] == "batchloop" and r["batchloop_name"] == "cli" for r in records)
