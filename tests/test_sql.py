"""The SQL package: the literal/inline helpers the fast path and scripts use, and schema.sql.

``sql/schema.sql`` is the schema the migrations make, written out in one file (procrastinate's
``schema.sql``); ``batchloop sql`` prints it. The catalog test below applies the migrations to
one fresh database and ``batchloop sql`` to another and compares what they made, so a new
migration without the matching change to schema.sql fails it (and so does the header check).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import batchloop.sync as bls
from batchloop import sql
from batchloop.migrations import code_version, migrations, schema_script

# ------------------------------------------------------------------------ literal and inline


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3, "3"),
        (2**63 - 1, "9223372036854775807"),
        # negative numbers parenthesised: after a "-" in the query they must not start a comment
        (-7, "(-7)"),
        (1.5, "1.5"),
        (1e-05, "1e-05"),
        (-0.5, "(-0.5)"),
        ("", "$bl$$bl$"),
        ("it's", "$bl$it's$bl$"),
        ("back\\slash", "$bl$back\\slash$bl$"),
        ("$", "$bl$$$bl$"),
        ("a$$b", "$bl$a$$b$bl$"),
        ("x$1", "$bl$x$1$bl$"),
        ("ends with $", "$bl$ends with $$bl$"),
        ("$bl$ inside", "$bl1$$bl$ inside$bl1$"),
        ("$bl and $bl1", "$bl2$$bl and $bl1$bl2$"),
    ],
)
def test_literal_text(value: object, text: str) -> None:
    assert sql.literal(value) == text


class _Color(enum.IntEnum):
    RED = 1


def test_literal_of_int_and_float_subclasses_is_the_number() -> None:
    assert sql.literal(_Color.RED) == "1"  # str() of an IntEnum is its name


@pytest.mark.parametrize(
    "value",
    [None, True, False, "nul\x00inside", math.inf, -math.inf, math.nan, b"bytes", [1], object()],
)
def test_literal_refuses_what_cannot_be_inlined_safely(value: object) -> None:
    assert sql.literal(value) is None
    assert sql.inline("forget_host", "batchloop", value) is None
    with pytest.raises(ValueError, match="cannot be written as a literal"):
        sql.script("batchloop", [("forget_host", (value,))])


def test_inline_replaces_each_parameter_once() -> None:
    # $2's value holds "$1": inlined in one pass, it is not replaced in turn.
    text = sql.inline("notify", "s", "ch", "x$1y")
    assert text == "SELECT pg_notify($bl$ch$bl$, $bl$x$1y$bl$)"
    assert sql.inline("record_migration", "s", 12, "init") == (
        'INSERT INTO "s".schema_migrations (version, name) VALUES (12, $bl$init$bl$)'
    )


def test_script_joins_statements() -> None:
    text = sql.script("s", [("unlock_all", ()), ("forget_host", ("h'1",))])
    statements = [line for line in text.splitlines() if not line.startswith("--")]
    assert statements == [
        "SELECT pg_advisory_unlock_all();",
        'DELETE FROM "s".hosts WHERE host_id = $bl$h\'1$bl$;',
    ]


_TEXT = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40
) | st.lists(st.sampled_from(["$", "bl", "1", "'", "\\", "$bl$", "x", "-", "\n"])).map("".join)


_FIXTURE = [HealthCheck.function_scoped_fixture]


@pytest.fixture(scope="module")
def server(pg_admin_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        yield conn


@settings(max_examples=200, deadline=None, suppress_health_check=_FIXTURE)
@given(value=_TEXT, conforming=st.booleans())
def test_a_text_literal_reads_back_as_the_value(
    server: psycopg.Connection[Any], value: str, conforming: bool
) -> None:
    server.execute(f"SET standard_conforming_strings = {'on' if conforming else 'off'}")
    text = sql.literal(value)
    assert text is not None
    # Between other SQL, as the fast path sends it: the literal must end where it should.
    cur = server.execute(f"SELECT {text}, 1, {text}".encode())
    assert cur.fetchone() == (value, 1, value)


@settings(max_examples=100, deadline=None, suppress_health_check=_FIXTURE)
@given(value=st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False))
def test_a_number_literal_reads_back_as_the_value(
    server: psycopg.Connection[Any], value: float
) -> None:
    text = sql.literal(value)
    assert text is not None
    # After a "-": a negative literal must not start a comment (which would hide the 1).
    row = server.execute(f"SELECT 0::numeric-{text}, 1".encode()).fetchone()
    assert row is not None and row[1] == 1
    assert (int(row[0]) if isinstance(value, int) else float(row[0])) == -value


# ------------------------------------------------------------------------ schema.sql

SCHEMAS = ("batchloop", "queue_x")  # the default, and one that is not: no name is written in

# Everything a migration can make in a schema, read from the catalog (not pg_dump, so that it
# runs wherever the tests do, the embedded server included).
CATALOG = {
    "relations": """
        SELECT c.relname, c.relkind, c.reloptions::text, c.relpersistence, c.relrowsecurity,
               c.relacl::text, pg_get_userbyid(c.relowner)
          FROM pg_class c WHERE c.relnamespace = %(n)s::regnamespace ORDER BY c.relname""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attcollation,
               row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum)
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = %(n)s::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY c.relname, a.attnum""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
          FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
         WHERE k.connamespace = %(n)s::regnamespace ORDER BY c.relname, k.conname""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relnamespace = %(n)s::regnamespace ORDER BY c.relname""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid),
               p.proacl::text
          FROM pg_proc p WHERE p.pronamespace = %(n)s::regnamespace
         ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), t.tgenabled
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = %(n)s::regnamespace AND NOT t.tgisinternal
         ORDER BY c.relname, t.tgname""",
    "types": """
        SELECT t.typname, t.typtype,
               (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
                  FROM pg_enum e WHERE e.enumtypid = t.oid)::text
          FROM pg_type t WHERE t.typnamespace = %(n)s::regnamespace ORDER BY t.typname""",
    "comments": """
        SELECT d.classoid::regclass::text, coalesce(c.relname, p.proname), d.objsubid,
               d.description
          FROM pg_description d
          LEFT JOIN pg_class c ON d.classoid = 'pg_class'::regclass AND c.oid = d.objoid
          LEFT JOIN pg_proc p ON d.classoid = 'pg_proc'::regclass AND p.oid = d.objoid
         WHERE c.relnamespace = %(n)s::regnamespace OR p.pronamespace = %(n)s::regnamespace
         ORDER BY 1, 2, 3""",
    "policies": """
        SELECT c.relname, pol.polname, pol.polcmd, pg_get_expr(pol.polqual, pol.polrelid)
          FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid
         WHERE c.relnamespace = %(n)s::regnamespace ORDER BY 1, 2""",
    "schema": "SELECT nspacl::text FROM pg_namespace WHERE nspname = %(n)s",
    "record": "SELECT version, name FROM {q}.schema_migrations ORDER BY version",
    "version": "SELECT {q}.schema_version()",
}


def _catalog(dsn: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {
            what: conn.execute(
                query.replace("{q}", f'"{schema}"'),
                {"n": schema},  # type: ignore[arg-type]
            ).fetchall()
            for what, query in CATALOG.items()
        }


@pytest.fixture
def second_dsn(pg_admin_dsn: str, dsn: str) -> Iterator[str]:
    """Another fresh database (``dsn``'s name with a suffix), dropped afterwards."""
    name = pgsql.Identifier(f"{conninfo_to_dict(dsn)['dbname']}_b")
    with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
        admin.execute(pgsql.SQL("CREATE DATABASE {}").format(name))
    try:
        yield make_conninfo(dsn, dbname=f"{conninfo_to_dict(dsn)['dbname']}_b")
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


def test_schema_sql_names_the_latest_migration() -> None:
    latest = migrations()[-1]
    first = sql.schema().splitlines()[0]
    assert f"after migration {latest.version:04d} ({latest.name})" in first, (
        f"a migration was added: write its effect into batchloop/sql/schema.sql too, and say "
        f"'after migration {latest.version:04d} ({latest.name})' on its first line"
    )


def test_migrations_and_schema_sql_make_the_same_catalog(dsn: str, second_dsn: str) -> None:
    for schema in SCHEMAS:
        assert bls.migrate(dsn, schema=schema) == list(range(1, code_version() + 1))
        with psycopg.connect(second_dsn, autocommit=True) as conn:
            conn.execute(schema_script(schema).encode())
    for schema in SCHEMAS:
        migrated, written = _catalog(dsn, schema), _catalog(second_dsn, schema)
        assert migrated["columns"] and migrated["functions"] and migrated["triggers"]
        for what in CATALOG:
            assert written[what] == migrated[what], (
                f"schema {schema!r}: {what} differ between the migrations and sql/schema.sql"
            )
    # And migrate sees the written schema as up to date.
    assert bls.migrate(second_dsn) == []


def test_no_parameter_is_inlined_into_a_comment() -> None:
    # A value inlined into a "--" comment could end it with a newline and be read as SQL.
    for name in sql._raw():
        for line in sql.query(name, "s").splitlines():
            comment = line.partition("--")[2]
            assert not re.search(r"\$\d", comment), f"{name}: {line!r}"


def test_session_script_is_for_queries_that_name_no_schema() -> None:
    assert sql.session_script("server_keepalive", 10, 5, 3) == (
        "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
        "SET tcp_keepalives_count = 3"
    )
    with pytest.raises(ValueError, match="names the schema"):
        sql.session_script("forget_host", "h")
