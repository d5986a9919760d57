"""Named SQL queries, loaded once from ``queries.sql`` and specialised per schema and driver."""

from __future__ import annotations

import math
import re
from functools import cache
from importlib.resources import files

from ..schema_name import quote_schema

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_PARAM = re.compile(r"\$(\d+)")


@cache
def _raw() -> dict[str, str]:
    text = files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def names() -> frozenset[str]:
    return frozenset(_raw())


@cache
def query(name: str, schema: str) -> str:
    """The query ``name`` for ``schema`` with ``$n`` parameters (asyncpg's style)."""
    return _raw()[name].replace("{schema}", quote_schema(schema))


@cache
def pyformat(name: str, schema: str) -> str:
    """The same query with ``%(pN)s`` parameters (psycopg's style)."""
    return _PARAM.sub(r"%(p\1)s", query(name, schema).replace("%", "%%"))


def literal(value: object) -> str | None:
    """``value`` as an SQL literal, or None if it cannot be inlined safely."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str):
        # Dollar quoting does not depend on standard_conforming_strings.
        if "$bl" in value or "\x00" in value or value.endswith("$"):
            return None
        return f"$bl${value}$bl$"
    if isinstance(value, float):
        number = float(value)  # a subclass's repr may not be a number (numpy's)
        # repr() of inf or nan is a bare word, which SQL would read as a column name.
        if not math.isfinite(number):
            return None
        text = repr(number)
    else:
        text = str(int(value))  # an IntEnum's str() is its name
    # Parenthesised, a negative number cannot turn a "-" before it into a comment ("--").
    return f"({text})" if text.startswith("-") else text


def inline(name: str, schema: str, *args: object) -> str | None:
    """The query with its parameters inlined as literals, to send in one simple-protocol
    message with other statements; None if some value cannot be inlined safely."""
    literals = [literal(a) for a in args]
    if any(lit is None for lit in literals):
        return None
    text = query(name, schema)
    for n in range(len(literals), 0, -1):  # $10 before $1
        text = text.replace(f"${n}", literals[n - 1])  # type: ignore[arg-type]
    return text
