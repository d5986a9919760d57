"""Validation and quoting of the schema name that every call accepts."""

from __future__ import annotations

import re

DEFAULT_SCHEMA = "batchloop"
# Short enough that the NOTIFY channel "batchloop:<schema>" fits PostgreSQL's 63-byte names.
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}")


def check_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _IDENT.fullmatch(schema):
        raise ValueError(
            f"invalid schema name {schema!r}: use 1 to 50 letters, digits or underscores, "
            "not starting with a digit"
        )
    return schema


def quote_schema(schema: str) -> str:
    return '"' + check_schema(schema) + '"'


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel; must match the SQL function ``channel()``."""
    return f"batchloop:{check_schema(schema)}"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        raise ValueError(f"a worker name must be a string of 1 to 200 characters, got {name!r}")
    # PostgreSQL text holds neither; refused here so that no SQL runs (and nothing is half done).
    if "\x00" in name:
        raise ValueError(f"a worker name cannot contain a NUL character (\\x00), got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"a worker name must be valid Unicode (no lone surrogates), got {name!r}"
        ) from None
    return name
