"""batchloop from a synchronous script, with psycopg and :mod:`batchloop.sync`.

    BATCHLOOP_DSN=postgresql://user@localhost/mydb python examples/sync_script.py

Enqueues events in one psycopg transaction that also pings the ``events`` loop, then shows its
status and lists every worker. Enqueuing needs no host; to process the events, run a host that
registers the same callables, in another terminal:

    cd examples && BATCHLOOP_DSN=... batchloop run quickstart
"""

from __future__ import annotations

import os
import sys

import psycopg
from quickstart import CREATE_TABLE, NAME, handle_events, next_events

import batchloop.sync as bls


def main(dsn: str) -> None:
    applied = bls.migrate(dsn)  # idempotent
    print(f"migrated: {applied or 'already up to date'}")

    with psycopg.connect(dsn) as conn:  # the `with` block commits at the end
        conn.execute(CREATE_TABLE)
        conn.commit()
        with conn.transaction():  # the insert and the ping commit together
            conn.execute("INSERT INTO events (value) SELECT g FROM generate_series(1, 10) g")
            result = bls.ping(conn, NAME, next_events, handle_events)
        print(f"ping: {result}")

        status = bls.status(conn, NAME)
        assert status is not None
        owner = f"{status.owner.hostname}:{status.owner.pid}" if status.owner else "no live host"
        print(f"{NAME!r}: {status.state}, generation {status.generation}, owner {owner}")
        for worker in bls.list_workers(conn):
            print(f"  {worker.name}: {worker.state}, {worker.batches} batch(es)")


if __name__ == "__main__":
    dsn = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        sys.exit("usage: BATCHLOOP_DSN=postgresql://user@host/db python examples/sync_script.py")
    main(dsn)
