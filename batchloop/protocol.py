"""How batchloop keeps exactly one loop per name and never loses a wakeup.

This module holds no code: it is the protocol's one description, in the manner of River's
``internal/leadership/doc.go``. Each section ends with the module that implements it (``->``).
The SQL it refers to is in ``migrations/`` (applied in order; ``batchloop/sql/schema.sql`` is the
result) and ``batchloop/sql/queries.sql`` (every named query); the runtime is in
``batchloop/runtime/``, one module per section; the client libraries are reached only through
``batchloop/drivers/`` (asyncpg, psycopg).

Tables
------
``workers`` (rarely written): name, callables (``module:qualname``), config, ``status`` in
``idle | waiting | running | stopped``, ``revision`` (bumped when callables or config change),
and two of the name's three advisory-lock keys, derived from schema and name: ``lock_key``
(ownership, a session lock) and ``wake_key`` (ping vs go-idle, transaction locks); the third,
the ``stop`` key (stop vs iterations), is computed by ``lock_key('stop', name)`` and handed to
a loop at its claim. ``worker_state`` (written every batch): ``generation``,
``owner_host``, ``next_run_at``, ``last_work_at``, counters, the last error, and ``revision``, a
copy of ``workers.revision`` kept by a trigger (see "Revisions" below). ``hosts``: one row
per live host with a heartbeat. Lock order is always ``worker_state`` row, then ``workers`` row.

States
------
::

            ping (new)                    query: Idle, past cooldown, confirmed
    (none) -----------> RUNNING ---------------------------------------------> IDLE
                         ^  |  \\                                               |
          ping / start / |  |   \\ query: Idle(timeout=t), t > max(1 s, poll)   | ping
          deadline       |  |    `----------------------------> WAITING         |
                         |  |                                    |   | ping    |
                         |  +--- stop ---> STOPPED <--- stop ----+   | (not due|
                         |                   |                       |  within |
                         +---------- start --+                       |  1 s)   |
                         +-------------------------------------------+---------+

RUNNING and WAITING names have an owner: the host whose control connection holds the name's
session advisory lock (``pg_try_advisory_lock(lock_key)``). IDLE and STOPPED names have none.

-> ``migrations/`` (the tables and the transitions' plpgsql functions: ``ping``, ``stop_worker``,
``start_worker``, ``claim``, ``claim_many``); the calls users make are described once in
:mod:`batchloop.calls` and run by :mod:`batchloop.api` (async) and :mod:`batchloop.sync`.

Generations and fencing
-----------------------
Every claim increments ``worker_state.generation`` and so does ``stop``. A loop remembers the
generation it claimed, and every iteration transaction begins by writing its ``worker_state``
row *where the generation is still its own* (``book_batch``: the batch's bookkeeping, put back
if the query finds no work; when it matches nothing, the full ``fence``, a ``SELECT ... FOR
UPDATE`` under the same condition, says why). Either way the row is locked until the iteration
ends. So:

* a claim or stop that bumps the generation waits for the in-flight iteration's row lock: the
  old loop's batch either commits before the bump, or rolls back;
* after the bump commits, an old loop's fence finds no row and it exits without writing.

Claims commit without waiting for their WAL flush (the control session runs with
``synchronous_commit`` off: the flush was half of an idle wake-up's latency). A claim is visible
at once all the same; only a server crash can lose it, and that crash ends every session, so
every name's session lock, too. The generation a lost claim had written can then be written
again by another host's claim, which is why the fence tests the owner with the generation
(``worker_state.owner_host``, which every claim writes): the loop of a lost claim never passes
it. Its own host cancels all its loops when its control session goes, before it opens the next
one and claims again, so its stale loops never meet its own new claim either. And nothing a
loop commits can outlive its claim: its batch commits wait for their flush, which covers every
earlier WAL record, the claim's included.

``stop`` first takes the name's ``stop`` advisory lock exclusively; every iteration try-locks it
shared, so once a stop is waiting for the in-flight batch no further batch can start (row locks
alone are not granted in arrival order, and a busy loop could otherwise keep winning the row).

At most one generation commits batches at a time, whatever the session locks say. The session
lock is only the fast path that tells hosts who should run a name; the fence is what makes a
superseded or zombie loop harmless (for instance one whose control connection was terminated
while its pool connection lived on). The worker's writes and the bookkeeping (``batches``,
``last_work_at``) are in that same transaction.

-> :mod:`batchloop.runtime.iteration` (the whole transaction: ``BEGIN`` with ``book_batch`` in
one message, the fence, the callables, go-idle, the closing statements sent with ``COMMIT``)
over a driver's :class:`~batchloop.drivers.base.WorkConnection`; the control session's
settings in :mod:`batchloop.runtime.session`.

Revisions
---------
A ping that brings new callables or config bumps ``workers.revision`` in the producer's
transaction, and the work it inserted must be run by them: any batch whose work query can see
rows committed with a revision change runs under that revision (Convex gets this by reading the
worker record and running the query in one snapshot). ``book_batch`` therefore tests the
revision the loop loaded, and on ``worker_state.revision``, not ``workers.revision``. The
change locks the state row (lock order) and a trigger (``mirror_revision``, fired only when the
revision changes) writes the new revision there. So either

* the change committed before ``book_batch`` locked the row: ``book_batch`` sees the new
  revision, in its snapshot or in PostgreSQL's re-check of the row's newest version after
  waiting for the lock, matches nothing, and the fence reloads the callables; or
* ``book_batch`` locked the row first: the change waits for the iteration to end, so its rows
  are not visible to the iteration's work query.

The revision has to be on the row being updated because that re-check (EvalPlanQual) re-reads
only the target row: a joined ``workers`` row stays as the statement's snapshot saw it, so a
test of ``workers.revision`` matched the old revision after the wait, while the work query, a
later statement with a later snapshot, saw the ping's rows (alternating two workers on a busy
loop sent a few items in a hundred to the old one). For the same reason the fence returns
``worker_state.revision``; it holds the state row, so no revision can change under it, and the
``load_worker`` that follows reads callables of exactly that revision. A ping that changes
nothing still writes and locks nothing.

-> ``migrations/0004_state_revision.sql`` (the mirror), :mod:`batchloop.runtime.iteration`
(the fence and the reload).

Who is authoritative
--------------------
The database, always, with its own clock: deadlines (``next_run_at``) and heartbeats are
``now()`` values compared in SQL. A host's clock only measures durations: how long to sleep, and
how long a loop has been cooling down since its last batch (counted from the database's
``now() - last_work_at`` at the claim and after every wake-up, then from its own batches; the
cooldown only decides when to stop polling, and going idle is confirmed under the wake lock
whatever it says).

-> :mod:`batchloop.runtime.loop` (one name's schedule: sleep, re-arm from the database, failure
backoff, release) and the pure decisions in :mod:`batchloop.runtime.decide`.

No lost wakeup
--------------
A ping runs in the producer's transaction. It takes ``pg_advisory_xact_lock_shared(wake_key)``
(in memory, released at commit) and then reads ``workers.status`` in a new statement, so with
READ COMMITTED it sees every status change that committed before it got the lock. If the
worker is idle (or waiting and not due within 1 s) it sets it running and ``NOTIFY``s; if it
is running it does nothing at all: no row written, no row locked, no NOTIFY (NOTIFY takes a
database-wide lock at commit, so it is sent only on transitions).

A loop goes idle only through ``try_go_idle``: ``pg_try_advisory_xact_lock(wake_key)``, the
exclusive mode, which fails while any ping transaction of the name is in flight (the loop then
just polls again). Holding it, the loop re-runs the work query in a fresh snapshot and commits
IDLE only if it still finds nothing. Every ping either committed before that lock was taken
(so its rows are seen by the re-run query), or takes its shared lock after the go-idle commits
(so it reads IDLE and wakes the worker). Nothing falls between.

A poll that the previous poll's ``Idle`` says will be past the cooldown, and for which no
``c`` wake-up came in, takes the same lock in its first statement instead (``book_batch``
with its ``pg_try_advisory_xact_lock(wake_key)`` switched on), so its only query is the one run
holding the lock, and the argument above holds for it unchanged. If that statement matches
nothing (a ping in flight, or the fence), the loop books with ``book_batch`` and goes the usual
way. A query under the lock that finds work runs it as a batch, with pings of the name waiting
for its commit, as when the re-run query finds work.

Under REPEATABLE READ or SERIALIZABLE the ping's snapshot may predate the go-idle, so there it
reads the row ``FOR SHARE``: PostgreSQL then raises a serialization failure (40001) rather than
return the stale status; retry the transaction as for any serialization failure.

-> ``ping`` in ``migrations/`` (the shared lock and the re-read), the go-idle step in
:mod:`batchloop.runtime.iteration`, and when to take the lock first in
:func:`batchloop.runtime.decide.lock_first`.

Warm wake-ups
-------------
A loop that found no work polls until its cooldown ends, and a ping on it changes no status.
So that such a ping is not left for the next poll, ``worker_state.cooling`` says whether the
loop's last committed iteration found no work: ``unbook_batch`` (sent with that iteration's
``COMMIT``) sets it and ``book_batch`` (every iteration's first statement) clears it, so it
costs no statement of its own. ``ping`` reads it in the statement it already runs; when the
worker is running and cooling it NOTIFYs ``c::<name>``, and only the owner acts on it: it runs
the loop at once if the loop sleeps until its next poll, or, if an iteration is in flight (its
query may have taken its snapshot before the ping committed), right after that iteration
instead of sleeping. A debounce, a failure backoff or a waiting deadline is never cut short.

A draining loop's last committed iteration processed a batch, so a ping on it still writes,
locks and sends nothing; pings during the first batch after a cooldown read the cooling flag of
the poll before it and NOTIFY, once each. Correctness does not depend on any of this: the
cooldown polls and the go-idle step above are unchanged, so a ping that reads ``cooling`` false
just before the loop's poll commits true (the one window: its read precedes that commit and its
own commit follows the poll's query) is picked up by the next poll, as before.

-> ``ping`` in ``migrations/0006_warm_wake.sql``, ``book_batch``/``unbook_batch`` in
``batchloop/sql/queries.sql``, the receiving side in :mod:`batchloop.runtime.wakeups` and
:meth:`batchloop.runtime.loop.NameLoop.work_arrived`.

Notifications and their loss
----------------------------
Wake-ups travel as ``NOTIFY batchloop:<schema>`` with payload ``w|s|r|c:<lock_key>:<name>``
(wake, stop, released, cooling; the key may be empty). Receivers use only the kind and the name
(a name may contain ``:``); hosts send their own ``r:`` goodbyes with the key left empty. Hosts
``LISTEN`` on their control connection. A notification can be
missed (connection lost, host starting), so nothing depends on it for correctness:

* after every (re)connection a host runs the monitor query at once;
* the monitor runs every ``monitor_interval`` (0.5 s) on every host: one query for all names,
  returning running or due-waiting names whose lock nobody holds (claim them), and names whose
  owner's heartbeat is older than the name's ``monitor_lag`` (terminate that host's backends,
  which frees its locks and aborts its open transactions, and claim its names in the same
  tick; a backend still on its way out makes that claim skip the name, and the next tick takes
  it);
* a host that releases a name (its loop went idle or was superseded) re-checks it at once,
  because a ping may have woken it while the lock was still held and the other hosts' claims
  failed.

Claims never wait. ``claim()`` locks the name's rows with ``SKIP LOCKED`` (a row held by an
in-flight iteration or an open ping transaction means "try again next tick"), takes the session
lock last, and releases it if anything fails after that, because a session lock survives the
statement's rollback. Hosts claim in batches (``claim_many``: the notifications that arrived
together, a monitor tick's orphans, or the names whose loops ended together, each re-checked in
the statement that unlocks it), up to 50 names per statement and one commit. ``claim_many``
first reads each name's status without locking (an idle or stopped name costs nothing; a ping
that wakes it later NOTIFYs), and a batch that fails half-way unlocks every name it had taken
before the error propagates.

Even shares: each heartbeat writes how many names its host owns (``hosts.owned``) and reads the
other live hosts' counts in the same statement. A host over an even share waits a little (up
to 50 ms, in proportion to its excess) before claiming names it was told about or its monitor
found without an owner, so the hosts with fewer names win them; what nobody took meanwhile it
still claims, so a name never waits for a host that is gone. Within a host, cooldown polls run
at most half a pool at a time: under load a poll runs late, a first batch does not (a ping on
a cooling loop wakes it anyway).

A control connection whose state is in doubt (a timed-out statement, a missed heartbeat, a host
row deleted by another host) is terminated at once rather than reused, which hands its names to
the other hosts immediately.

-> :mod:`batchloop.runtime.session` (the control connection: open and verify, heartbeat and
shares, LISTEN, ending a lost session's backends on the server they were on, goodbye),
:mod:`batchloop.runtime.wakeups` (the payload codec and the dispatcher),
:mod:`batchloop.runtime.claims` (the ownership ledger: owned, being claimed, to re-check,
lacking callables; claim, unlock, release), :mod:`batchloop.runtime.monitor` (orphans, frozen
owners, privilege explanations), all composed by :mod:`batchloop.runtime.host` (configuration,
start and stop, supervision of one control session at a time, drain on exit).

Recovery bounds
---------------
* Owner process dies or loses its connection: the server drops its session locks at once; the
  next monitor tick elsewhere claims (``monitor_interval`` + one claim, about 0.5 s).
* Owner frozen (SIGSTOP, GC pause, partition) with connections open: its heartbeat stops; after
  ``monitor_lag`` another host terminates its backends and claims. The frozen process, resumed,
  finds its connections gone, cancels its loops (their transactions were already rolled back)
  and reconnects as a fresh host; the generation fence stops any late commit.
* A host exiting normally finishes in-flight batches within ``shutdown_grace``, releases its
  locks and NOTIFYs ``r:`` so another host claims immediately.
* Waiting names keep their owner; if it dies, the monitor claims the name once it is due.

-> :mod:`batchloop.runtime.host` and the rooms above; ``tests/test_failover.py``,
``tests/test_faults.py`` and ``tests/test_ha.py`` measure the bounds.

Without a host
--------------
``tick`` claims each due name exactly as a host does (session lock on its one connection,
generation bump), drains it without cooldown polling until the query says idle or the budget
ends, and releases it: it never runs beside a live loop.

-> :mod:`batchloop.runtime.tick`.
"""
