"""Named SQL queries, loaded once from ``queries.sql`` and specialised per schema and driver."""

from __future__ import annotations

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
