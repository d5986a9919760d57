"""Django: a ``batchloop_run`` management command, and the DSN of a Django database (extra
``django``).

Add ``"batchloop.django"`` to ``INSTALLED_APPS``, then run a host next to your Django project::

    python manage.py batchloop_run myapp.jobs      # like `batchloop run myapp.jobs`

It connects to ``DATABASES["default"]`` (``--database`` picks another alias; ``--dsn`` or
``BATCHLOOP_DSN`` override it) and runs until SIGTERM (exit 0) or Ctrl-C (130), letting
in-flight batches finish first. ``settings.BATCHLOOP_MODULES`` gives the modules when the
command names none. Pinging from a view, in the request's transaction, needs nothing from this
app; the sync API takes Django's psycopg 3 connection::

    from django.db import connection, transaction
    import batchloop.sync as bls

    with transaction.atomic():
        Event.objects.create(value=1)
        bls.ping(connection.connection, "events", next_events, handle_events)

See docs/integrations.md.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

__all__ = ["dsn_from_settings"]


def dsn_from_settings(alias: str = "default") -> str:
    """A ``postgresql://`` URL for Django's ``DATABASES[alias]`` (asyncpg and psycopg take it).

    Raises ``ValueError`` for an alias that is missing or not PostgreSQL. The URL carries the
    database's password, if it has one: do not log it.
    """
    from django.conf import settings

    databases: dict[str, dict[str, Any]] = settings.DATABASES
    if alias not in databases:
        raise ValueError(f"no database {alias!r} in settings.DATABASES")
    db = databases[alias]
    engine = str(db.get("ENGINE", ""))
    if "postgresql" not in engine and "postgis" not in engine:
        raise ValueError(f"DATABASES[{alias!r}] is not PostgreSQL (ENGINE {engine!r})")
    user, password = str(db.get("USER") or ""), str(db.get("PASSWORD") or "")
    host, port = str(db.get("HOST") or ""), str(db.get("PORT") or "")
    netloc = ""
    if user:
        netloc = quote(user, safe="") + (":" + quote(password, safe="") if password else "") + "@"
    query: dict[str, str] = {}
    if host.startswith("/"):  # a unix socket directory goes in the query, as libpq takes it
        query["host"] = host
        if port:
            query["port"] = port
    elif host:
        netloc += f"[{host}]" if ":" in host else host
        netloc += f":{port}" if port else ""
    options = db.get("OPTIONS") or {}
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey", "application_name"):
        if key in options:
            query[key] = str(options[key])
    path = "/" + quote(str(db.get("NAME") or ""), safe="")
    return f"postgresql://{netloc}{path}" + (f"?{urlencode(query, safe='/')}" if query else "")
