"""docs/integrations.md: its Python compiles, and the files it points to exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "integrations.md"
TEXT = DOC.read_text(encoding="utf-8")
SNIPPETS = re.findall(r"```python\n(.*?)```", TEXT, re.DOTALL)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_compiles(index: int) -> None:
    lines = SNIPPETS[index].splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    compile("\n".join(line[indent:] for line in lines), f"<snippet {index}>", "exec")


def test_files_it_names_exist() -> None:
    named = set(re.findall(r"`((?:tests|examples|batchloop|docs)/[\w/.]+\.\w+)`", TEXT))
    named |= {m for m in re.findall(r"\]\(\.\./([\w/.-]+)\)", TEXT)}
    assert len(named) >= 6
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing


def test_readme_links_it() -> None:
    assert "(docs/integrations.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
