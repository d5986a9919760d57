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
from datetime import datetime, timezone

from .models import HostStatus, WorkerStatus

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


def relative(when: datetime | None, now: datetime) -> str:
    """``when`` relative to ``now``: "in 4 s", "12 s ago", "now", "-" for None."""
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    if abs(delta) < 1.0:
        return "now"
    span = _span(abs(delta))
    return f"in {span}" if delta > 0 else f"{span} ago"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def state_label(s: WorkerStatus) -> str:
    """The state as an operator should read it: a name nobody runs says so."""
    return f"{s.state} (no host)" if s.stale else s.state


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_status_table(statuses: Sequence[WorkerStatus], now: datetime | None = None) -> str:
    """A fixed-width table of workers (the default ``status`` output); times relative to
    ``now`` (default: this machine's clock)."""
    now = now if now is not None else datetime.now(timezone.utc)
    header = (
        *("NAME", "STATE", "GEN", "OWNER", "BATCHES", "FAILS", "LAST ERROR", "NEXT RUN"),
        "LAST WORK",
    )
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
                state_label(s),
                str(s.generation),
                _clip(printable(owner), 30),
                str(s.batches),
                str(s.consecutive_failures),
                error,
                relative(s.next_run_at, now),
                relative(s.last_work_at, now),
            )
        )
    return _table(rows, right={2, 4, 5})


def format_hosts_table(hosts: Sequence[HostStatus], now: datetime | None = None) -> str:
    """A fixed-width table of hosts (``batchloop hosts``)."""
    now = now if now is not None else datetime.now(timezone.utc)
    rows = [("HOST", "HOSTNAME", "PID", "ALIVE", "STARTED", "HEARTBEAT", "OWNS")]
    for h in hosts:
        owned = ", ".join(printable(n) for n in h.owned) or "-"
        rows.append(
            (
                h.host_id,
                _clip(printable(h.hostname), 30),
                str(h.pid),
                "yes" if h.alive else "no",
                relative(h.started_at, now),
                relative(h.heartbeat_at, now),
                _clip(owned, 60),
            )
        )
    return _table(rows, right={2})


def _table(rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
