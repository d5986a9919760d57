"""A commit-order-safe cursor over an append-only table.

PostgreSQL has no commit timestamp that readers can page by (Convex's ``commitTs``). A
``bigserial`` or ``created_at`` cursor is assigned when a row is *inserted*, not when it
*commits*: a long transaction that inserted id 10 may commit after a short one that inserted id
11, and a reader that already moved its cursor past 11 never sees 10.

The fix: record the inserting transaction's id in the row (an ``xid8`` column whose default is
``pg_current_xact_id()``), and let a reader pass only rows whose transaction is older than every
transaction still in flight, ``xid < pg_snapshot_xmin(pg_current_snapshot())``. Every
transaction below that bound has ended, and every transaction that starts later gets a larger
id, so the set of visible rows below the bound never grows again: a cursor on ``(xid, id)``
that only moves through it loses nothing. A long transaction holds readers back (they wait for
it, they do not skip it).

Create the table with :func:`xid_column` (or add the column with :func:`add_xid_column`), and
read with :func:`settled`::

    import batchloop.cursor as blc

    CREATE = f"CREATE TABLE events (id bigserial PRIMARY KEY, {blc.xid_column()}, body text)"
    NEXT = f'''
        SELECT xid, id, body FROM events
        WHERE {blc.settled()} AND (xid, id) > ($1::xid8, $2::bigint)
        ORDER BY xid, id LIMIT 100
    '''

Keep the cursor (the last ``(xid, id)`` passed) in a table written in the same transaction as
the work it drove: a batchloop worker does exactly that. ``examples/recipes/ordered_cursor.py``
is a complete recipe, and tests/test_recipes.py shows a ``bigserial`` cursor losing rows where
this one loses none.

Notes:

* Needs PostgreSQL 13 or newer (``xid8``, ``pg_current_xact_id``, ``pg_current_snapshot``).
* Writing the column by hand defeats the point: leave it to the default.
* ``xid8`` is 64 bits (the epoch and the 32-bit id), so it never wraps around as ``xid`` does;
  it is the top-level transaction's id, also for rows inserted under a savepoint.
* The bound is server-wide: *any* open transaction that has written anything, in any table
  of any database on the server, holds readers back until it ends (transaction ids are the
  server's). Keep transactions short, as always; ``idle in transaction`` sessions show in
  ``pg_stat_activity``.
* So a reader can see committed rows past its cursor that do not pass yet. It must then look
  again soon, not go idle: the transaction holding the bound back may never ping. In a work
  query, return ``Idle(timeout=...)`` when rows matching :func:`unsettled` are left (the
  recipe does).
* The reader's own transaction counts as in flight once it has an id (a batchloop iteration
  has one): rows it inserts into the table it reads pass in a later transaction.
* Rows of a transaction that rolled back are never visible, so they are never waited for.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_COLUMN",
    "add_xid_column",
    "quote_identifier",
    "settled",
    "unsettled",
    "xid_column",
]

DEFAULT_COLUMN = "xid"
"""The column name the helpers use unless told otherwise."""

_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
_BOUND = "pg_snapshot_xmin(pg_current_snapshot())"
"""The oldest transaction id still in flight, by the current statement's snapshot."""


def quote_identifier(name: str, what: str = "column") -> str:
    """``name`` as a double-quoted SQL identifier, exactly as spelled (case kept).

    >>> quote_identifier("xid")
    '"xid"'
    >>> quote_identifier('odd"name')
    '"odd""name"'
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__}")
    if not name or len(name.encode()) > _MAX_IDENTIFIER or "\x00" in name:
        raise ValueError(f"invalid {what} name {name!r}: use 1 to 63 bytes, no NUL")
    return '"' + name.replace('"', '""') + '"'


def settled(column: str = DEFAULT_COLUMN, *, table: str | None = None) -> str:
    """The SQL condition that passes only rows whose inserting transaction has ended, and is
    older than every transaction still in flight.

    ``column`` is the row's ``xid8`` column filled by ``pg_current_xact_id()`` (see
    :func:`xid_column`); ``table`` qualifies it (a table name or an alias in your query). Both
    are quoted, so they must be spelled as in the catalog (lower case unless created quoted).
    Page through the passing rows ordered by ``(xid, id)`` and keep the last pair as the cursor.

    >>> settled()
    '"xid" < pg_snapshot_xmin(pg_current_snapshot())'
    >>> settled("txid", table="e")
    '"e"."txid" < pg_snapshot_xmin(pg_current_snapshot())'
    """
    return f"{_ref(column, table)} < {_BOUND}"


def unsettled(column: str = DEFAULT_COLUMN, *, table: str | None = None) -> str:
    """The negation of :func:`settled`: rows that are visible (committed) but may not be passed
    yet, because an older transaction is still in flight.

    >>> unsettled()
    '"xid" >= pg_snapshot_xmin(pg_current_snapshot())'
    """
    return f"{_ref(column, table)} >= {_BOUND}"


def _ref(column: str, table: str | None) -> str:
    ref = quote_identifier(column)
    if table is not None:
        ref = quote_identifier(table, "table") + "." + ref
    return ref


def xid_column(column: str = DEFAULT_COLUMN) -> str:
    """The column definition for ``CREATE TABLE``: the inserting transaction's id.

    >>> xid_column()
    '"xid" xid8 NOT NULL DEFAULT pg_current_xact_id()'
    """
    return f"{quote_identifier(column)} xid8 NOT NULL DEFAULT pg_current_xact_id()"


def add_xid_column(table: str, column: str = DEFAULT_COLUMN) -> str:
    """``ALTER TABLE`` adding :func:`xid_column` to an existing table.

    Existing rows get the id of the transaction that runs the statement: a reader passes them
    once it commits. ``table`` may be schema-qualified with a dot (``"app.events"``).

    >>> print(add_xid_column("app.events"))  # doctest: +NORMALIZE_WHITESPACE
    ALTER TABLE "app"."events" ADD COLUMN IF NOT EXISTS
        "xid" xid8 NOT NULL DEFAULT pg_current_xact_id()
    """
    parts = table.split(".") if isinstance(table, str) else [table]
    if len(parts) > 2:
        raise ValueError(f"invalid table name {table!r}: use TABLE or SCHEMA.TABLE")
    qualified = ".".join(quote_identifier(p, "table") for p in parts)
    return f"ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS {xid_column(column)}"
