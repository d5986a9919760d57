"""mkdocs hooks for the batchloop docs site (mkdocs.yml ``hooks:``); no network, no imports of
the project: docstrings are read with ``ast``.

* ``<!-- docstring: PATH -->`` on a line of its own is replaced by the module docstring of
  ``PATH`` (relative to the repository root), turned from the project's plain-text style
  (underlined headings, ````code````, ``::`` literal blocks, ``:mod:`x``` roles) into Markdown.
  The protocol page renders ``batchloop/protocol.py`` so, and the recipes page each recipe's.
* ``<!-- api: MODULE -->`` becomes ``::: MODULE`` (the API reference of that module) when the
  module exists in the tree, and nothing otherwise: modules that land later (``batchloop.jobs``,
  ``batchloop.testing``, ``batchloop.fastapi``) join the reference without an edit here.
* Sphinx roles left in the library's docstrings (``:mod:`x``` renders as ``:mod:`` and a code
  span in the API reference) lose the role.
* Links out of the docs folder (``](../README.md)``, ``](../examples/...)``) point at the
  repository instead, where those files are.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- docstring: (\S+) -->$", re.MULTILINE)
API = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)
OUTSIDE = re.compile(r"\]\(\.\./([^)#\s]+)(#[^)\s]*)?\)")
ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc):`~?([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
HTML_ROLE = re.compile(r":(?:mod|func|class|meth|attr|data|exc|obj):(<code[^>]*>)~?")


def docstring(path: str) -> str:
    source = (ROOT / path).read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source), clean=True)
    if doc is None:
        raise ValueError(f"{path} has no module docstring")
    return doc


def _language(block: list[str]) -> str:
    text = "\n".join(block)
    if re.search(r"^\s*(import |from \S+ import |def |async def |[A-Z_]+ = )", text, re.M):
        return "python"
    if re.search(r"^\s*([A-Z_]+=\S*\s|curl |uvicorn |python |batchloop |pip )", text, re.M):
        return "bash"
    return "text"


def to_markdown(doc: str) -> str:
    """The project's docstring style as Markdown."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    literal_next = False
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"[-=~]{3,}", nxt.strip()) and not line.startswith(" "):
            out += ["## " + line.strip(), ""]
            i += 2
            continue
        indented = line.startswith("    ") and (not out or not out[-1].strip())
        if indented and (literal_next or not _in_list(out)):
            block: list[str] = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["```" + _language(block), *block, "```", ""]
            literal_next = False
            continue
        if line.rstrip().endswith("::"):
            head = line.rstrip()[:-2].rstrip()
            literal_next = True
            if head:
                out.append(head + ":")
            i += 1
            continue
        if line.startswith("-> "):
            line = "**Where:** " + line[3:]
        out.append(line)
        i += 1
    # Inline markup last, over whole paragraphs (a literal may wrap), never inside code blocks.
    parts = re.split(r"(^```[a-z]*\n.*?^```$)", "\n".join(out), flags=re.M | re.S)
    return "".join(p if p.startswith("```") else _inline(p) for p in parts)


def _in_list(out: list[str]) -> bool:
    """Whether the paragraph before the blank line above was a list item (a continuation)."""
    for line in reversed(out[:-1]):
        if not line.strip():
            return False
        if re.match(r"^\s*([*-]|\d+\.) ", line):
            return True
    return False


def _inline(text: str) -> str:
    return LITERAL.sub(r"`\1`", ROLE.sub(r"`\1`", text))


def module_exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = MARKER.sub(lambda m: to_markdown(docstring(m.group(1))), markdown)
    markdown = API.sub(lambda m: f"::: {m.group(1)}" if module_exists(m.group(1)) else "", markdown)
    repo = str(config.get("repo_url") or "").rstrip("/")
    if repo:
        markdown = OUTSIDE.sub(
            lambda m: f"]({repo}/blob/main/{m.group(1)}{m.group(2) or ''})", markdown
        )
    return markdown


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return HTML_ROLE.sub(r"\1", html)
