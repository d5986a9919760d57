"""Text from the database made safe to print on an operator's terminal.

Names and error messages are whatever users' code put there. Printed raw, a control character
can clear the screen or rewrite what is shown (ESC sequences, a carriage return), and a bidi
override can make a line read differently from what it holds. The table view of ``batchloop
status`` shows such characters as Python-style escapes instead; ``--json`` stays verbatim (JSON
escapes control characters itself). The table itself is here too, for the CLI and the demo.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from datetime import datetime

from .models import WorkerStatus

_BIDI = frozenset(
    "\u061c"  # ARABIC LETTER MARK
    "\u200e\u200f"  # LEFT-TO-RIGHT / RIGHT-TO-LEFT MARK
    "\u202a\u202b\u202c\u202d\u202e"  # embeddings, pop, overrides
    "\u2066\u2067\u2068\u2069"  # isolates
)
_UNSAFE_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
"""C0 and C1 controls and DEL; line and paragraph separators; lone surrogates."""


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    return char in _BIDI or unicodedata.category(char) in _UNSAFE_CATEGORIES


def printable(text: str) -> str:
    """``text`` with every character that could act on a terminal escaped (``\\x1b``,
    ``\\u202e``, ...); anything else, backslashes and non-ASCII letters included, unchanged."""
    if text.isprintable():  # the common case, and a fast one
        return text
    return "".join(_escape(c) if _unsafe(c) else c for c in text)


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_status_table(statuses: Sequence[WorkerStatus]) -> str:
    """A fixed-width table of workers (the default ``status`` output)."""
    header = ("NAME", "STATE", "GEN", "OWNER", "BATCHES", "FAILS", "LAST ERROR", "NEXT RUN")
    rows = [header]
    for s in statuses:
        owner = f"{s.owner.hostname}:{s.owner.pid}" if s.owner is not None else "-"
        error = s.last_error
        if s.config_error is not None:  # the loop cannot run until this is repaired
            error = f"config invalid: {s.config_error}"
        error = _clip(printable(" ".join(error.split())), 40) if error else "-"
        rows.append(
            (
                _clip(printable(s.name), 40),
                s.state,
                str(s.generation),
                _clip(printable(owner), 30),
                str(s.batches),
                str(s.consecutive_failures),
                error,
                _ago(s.next_run_at),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {2, 4, 5}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
