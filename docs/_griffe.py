"""A griffe extension for the API reference (mkdocs.yml: mkdocstrings ``extensions``).

The project's docstrings are prose with doctests, not Markdown: a ``>>>`` example would render
as nested block quotes, and its output (``['a', 'b']``) would be read as a Markdown reference
link. So doctest runs become ``pycon`` code blocks, and a paragraph ending in ``::`` (the
reStructuredText literal marker before an indented code block) ends in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PROMPT = re.compile(r"^(\s*)>>> ")


def fence_doctests(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else PROMPT.match(line)
        if match is None:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not in_fence and line.rstrip().endswith("::") and not nxt.strip():
                line = line.rstrip()[:-1]
            out.append(line)
            i += 1
            continue
        indent = match.group(1)
        block = []
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            block.append(lines[i][len(indent) :])
            i += 1
        out += [indent + "```pycon", *(indent + b for b in block), indent + "```"]
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
