"""mypy sees a job's payload type: ``send_email.dispatch(conn, Email(...))`` checks, a wrong
payload does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SNIPPET = """
from typing import Any
import pydantic
import batchloop.jobs as jobs

class Email(pydantic.BaseModel):
    to: str

@jobs.job("snippet.email")
async def send_email(ctx: jobs.JobContext, payload: Email) -> dict[str, Any] | None:
    await ctx.progress(50)
    return None

async def use(conn: Any) -> int:
    ids: list[int] = await send_email.dispatch_many(conn, [Email(to="x")])
    run = await jobs.get(conn, ids[0])
    assert run is None or run.status in ("pending", "running")
    return await send_email.dispatch(conn, PAYLOAD, key="k")
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the cases: the first run analyses batchloop, the others reuse it."""
    return tmp_path_factory.mktemp("mypy-cache")


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ('Email(to="a@b.c")', None),
        ("42", 'Argument 2 to "dispatch" of "Job" has incompatible type "int"; expected "Email"'),
        ('{"to": "a@b.c"}', 'expected "Email"'),
    ],
)
def test_mypy_checks_the_payload_type(tmp_path: Path, payload: str, error: str | None) -> None:
    source = tmp_path / "snippet.py"
    source.write_text(SNIPPET.replace("PAYLOAD", payload))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if error is None:
        assert done.returncode == 0, done.stdout
    else:
        assert done.returncode == 1 and error in done.stdout, done.stdout
