"""The docs site (mkdocs.yml) builds with --strict, offline, and has every page it promises."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(
    p.stem for p in (ROOT / "examples" / "recipes").glob("*.py") if not p.stem.startswith("_")
)

MISSING = [
    m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    if importlib.util.find_spec(m.split(".")[0]) is None
]  # fmt: skip
needs_mkdocs = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the docs extra is not installed ({', '.join(MISSING)} missing): "
    "pip install -e '.[docs]'",
)


def _hooks(name: str = "_hooks") -> object:
    spec = importlib.util.spec_from_file_location(f"docs{name}", ROOT / "docs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_mkdocs
def test_docs_site_builds_strict_and_offline(tmp_path: Path) -> None:
    site = tmp_path / "site"
    # Any attempt to reach the network goes to a closed port and fails the build.
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    env.update(http_proxy=dead, https_proxy=dead, no_proxy="", NO_PROXY="")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    for page in (
        "concepts", "protocol", "recipes", "deployment", "observability", "benchmarks",
        "reliability", "testing", "integrations", "jobs", "api",
    ):  # fmt: skip
        assert (site / page / "index.html").is_file(), f"{page} page missing"
    pages = {p: p.read_text(encoding="utf-8") for p in site.rglob("*.html")}
    for path, html in pages.items():
        assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html, path
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for anchor in (
        "batchloop.ping", "batchloop.Host", "batchloop.tick", "batchloop.Idle",
        "batchloop.sync.ping", "batchloop.cursor.settled", "batchloop.cursor.xid_column",
    ):  # fmt: skip
        assert f'id="{anchor}"' in api, f"{anchor} not in the API reference"
    assert ":mod:" not in api and ":class:" not in api  # Sphinx roles are cleaned up
    assert "<blockquote" not in api  # doctests are code blocks, not nested quotes
    for later in ("batchloop.jobs", "batchloop.testing", "batchloop.fastapi"):
        if _hooks().module_exists(later):  # type: ignore[attr-defined]
            assert f'id="{later}"' in api, f"{later} exists but is not in the API reference"
    protocol = (site / "protocol" / "index.html").read_text(encoding="utf-8")
    for heading in ("Generations and fencing", "No lost wakeup", "Without a host"):
        assert re.search(rf"<h2[^>]*>{heading}", protocol), heading
    assert "<pre" in protocol and "RUNNING" in protocol  # the state diagram, as code
    recipes = (site / "recipes" / "index.html").read_text(encoding="utf-8")
    for recipe in RECIPES:
        assert f"examples/recipes/{recipe}.py" in recipes, recipe
    # links out of docs/ point at the repository
    assert "https://github.com/batchloop/batchloop/blob/main/examples/recipes/outbox.py" in recipes


def test_every_recipe_is_on_the_recipes_page_and_in_the_readme() -> None:
    page = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(RECIPES) >= 5
    for recipe in RECIPES:
        assert f"<!-- docstring: examples/recipes/{recipe}.py -->" in page, recipe
        assert f"(examples/recipes/{recipe}.py)" in readme, recipe


def test_docstring_to_markdown() -> None:
    hooks = _hooks()
    text = hooks.to_markdown(  # type: ignore[attr-defined]
        "Intro with ``code`` and :mod:`batchloop.cursor`.\n\n"
        "Heading\n-------\nA list::\n\n    import batchloop\n    x = 1\n\n"
        "* item\n  ``wrapped\n  literal``\n\n-> :class:`~batchloop.Host`"
    )
    assert text.splitlines() == [
        "Intro with `code` and `batchloop.cursor`.",
        "",
        "## Heading",
        "",
        "A list:",
        "",
        "```python",
        "import batchloop",
        "x = 1",
        "```",
        "",
        "* item",
        "  `wrapped",
        "  literal`",
        "",
        "**Where:** `batchloop.Host`",
    ]


@needs_mkdocs
def test_doctests_become_code_blocks() -> None:
    griffe_ext = _hooks("_griffe")
    text = griffe_ext.fence_doctests(  # type: ignore[attr-defined]
        "Use it so::\n\n    x = 1\n\n>>> f()\n['a', 'b']\n\nAfter.\n```\n>>> kept\n```"
    )
    assert text.splitlines() == [
        "Use it so:",
        "",
        "    x = 1",
        "",
        "```pycon",
        ">>> f()",
        "['a', 'b']",
        "```",
        "",
        "After.",
        "```",
        ">>> kept",
        "```",
    ]
