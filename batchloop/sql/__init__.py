"""Named SQL, loaded once from ``queries.sql`` and specialised per schema and driver, and the
current schema, ``schema.sql``. This package is the one place SQL text is written: code names
a query and passes its values, as parameters or (:func:`inline`, :func:`script`) as literals."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from functools import cache
from importlib.resources import files

from ..schema_name import DEFAULT_SCHEMA, quote_schema

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_PARAM = re.compile(r"\$(\d+)")
QUERY_FILES = ("queries.sql", "jobs.sql")
"""The named queries: the loop's, and batchloop.jobs' (one namespace: names do not repeat)."""


@cache
def _raw() -> dict[str, str]:
    found: dict[str, str] = {}
    for file in QUERY_FILES:
        parts = _NAME.split(files(__package__).joinpath(file).read_text(encoding="utf-8"))
        found.update(
            (name, _code(body)) for name, body in zip(parts[1::2], parts[2::2], strict=True)
        )
    return found


def _code(body: str) -> str:
    """A query without its comment lines, which are for readers: they name parameters ("$1"),
    and a value inlined into a comment could end it (a newline) and be read as SQL."""
    lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
    return "\n".join(lines).strip()


@cache
def query(name: str, schema: str) -> str:
    """The query ``name`` for ``schema`` with ``$n`` parameters (asyncpg's style)."""
    return _raw()[name].replace("{schema}", quote_schema(schema))


@cache
def pyformat(name: str, schema: str) -> str:
    """The same query with ``%(pN)s`` parameters (psycopg's style)."""
    return _PARAM.sub(r"%(p\1)s", query(name, schema).replace("%", "%%"))


@cache
def schema() -> str:
    """The schema as it stands after every migration (``schema.sql``), to run with the
    ``search_path`` set to the target schema, as a migration is."""
    return files(__package__).joinpath("schema.sql").read_text(encoding="utf-8")


def literal(value: object) -> str | None:
    """``value`` as an SQL literal, or None if it has none safe to inline: a string holding a
    NUL (PostgreSQL text cannot), a non-finite float, or any other type than int, float and str
    (bool and None included, whose parameter would carry a type)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str):
        if "\x00" in value:
            return None
        # Dollar quoting depends neither on standard_conforming_strings nor on the client
        # encoding (no multibyte character of any encoding holds a "$" byte). A tag the value
        # does not hold cannot end the string early: the lexer takes "$x$" for the end only
        # when x is the opening tag.
        tag, n = "bl", 0
        while f"${tag}" in value:
            n += 1
            tag = f"bl{n}"
        return f"${tag}${value}${tag}$"
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
    literals = []
    for value in args:
        lit = literal(value)
        if lit is None:
            return None
        literals.append(lit)
    # In one pass, so that a "$1" inside a value inlined for $2 is not replaced in turn.
    return _PARAM.sub(lambda m: literals[int(m[1]) - 1], query(name, schema))


def session_script(name: str, *args: object) -> str:
    """A query about the connection itself (naming no schema object), its values inlined."""
    if "{schema}" in _raw()[name]:
        raise ValueError(f"query {name!r} names the schema: use script()")
    return script(DEFAULT_SCHEMA, [(name, args)]).removesuffix(";")


def script(schema: str, queries: Iterable[tuple[str, tuple[object, ...]]]) -> str:
    """Named queries, their values inlined, as one script of statements: several in one round
    trip, or a statement that takes no parameters (DDL). Raises ValueError for a value that
    has no safe literal (see :func:`literal`)."""
    texts = []
    for name, args in queries:
        text = inline(name, schema, *args)
        if text is None:
            raise ValueError(f"query {name!r}: a value cannot be written as a literal: {args!r}")
        texts.append(text + ";")
    return "\n".join(texts)
