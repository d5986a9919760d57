"""Every Python snippet in README.md runs, as a program, against a fresh migrated database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
FILE = re.compile(r"# file: (\w+\.py)\n")
"""A snippet that starts with ``# file: NAME.py`` is a module the following snippets import."""


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int, dsn: str, tmp_path: Path) -> None:
    for earlier in SNIPPETS[: index + 1]:
        named = FILE.match(earlier)
        if named:
            (tmp_path / named.group(1)).write_text(earlier, encoding="utf-8")
    if FILE.match(SNIPPETS[index]):
        compile(SNIPPETS[index], "<snippet>", "exec")  # run by the snippet that imports it
        return
    script = tmp_path / f"snippet_{index}.py"
    script.write_text(SNIPPETS[index], encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGDATABASE")}
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**env, "BATCHLOOP_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"snippet {index} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"snippet {index} printed nothing"
