"""Faults across real processes, on a throwaway PostgreSQL cluster per test.

Each test runs real host processes (``run_host.py``) against a private cluster
(``cluster.pg_cluster``), a producer that inserts items and pings in one transaction (retrying
through connection errors), injects one kind of fault, and then checks the invariants:

* ``assert_invariants`` (no item lost or processed twice, committed batches of a name never
  overlap in time, generations never go backwards by batch start);
* every produced item is done (the ``produced`` table commits with the producer's insert, so it
  is the truth even when a commit's acknowledgement was lost);
* by *commit* time (``track_commit_timestamp`` is on in these clusters) a name's generations
  never go backwards: a superseded loop's transaction never commits after its successor's.

The recovery times are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

import batchloop as bl

from cluster import Cluster, pg_cluster_fixture  # noqa: F401  (the pg_cluster fixture)
from helpers import wait_for
from invariants import assert_invariants
from jobs import TABLES, next_items, process_items
from proxy import Proxy

pytestmark = pytest.mark.anyio
HERE = Path(__file__).parent
_EPS = dt.timedelta(milliseconds=50)

CONNECTION_ERRORS = (
    OSError,  # refused, reset (ConnectionError is an OSError)
    TimeoutError,
    asyncpg.InterfaceError,  # includes ConnectionDoesNotExistError
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.OperatorInterventionError,  # 57P01 admin shutdown, 57P03 cannot connect now, ...
    asyncpg.InternalClientError,  # a server shutdown message arriving between two statements
)


# --------------------------------------------------------------------------------------------
# Host processes


class HostProc:
    """One ``run_host.py`` process; stdout is read by a thread, stderr goes to a file."""

    def __init__(self, dsn: str, env: dict[str, str], err_path: Path) -> None:
        self.err_path = err_path
        self._err = open(err_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "run_host.py"), dsn],
            cwd=HERE,
            env={**os.environ, **env, "PYTHONPATH": str(HERE)},
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def host_id(self) -> str | None:
        for line in self.lines:
            if line.startswith("ready "):
                return line.split()[1]
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def warnings(self) -> list[str]:
        return [ln for ln in self.stderr().splitlines() if ln.startswith("WARNING:batchloop:")]

    async def ready(self, timeout: float = 15.0) -> str:  # noqa: ASYNC109 - a polling deadline
        def check() -> str | None:
            if self.host_id is None and not self.alive():
                raise AssertionError(f"host exited {self.proc.returncode}:\n{self.stderr()}")
            return self.host_id

        return await wait_for(check, timeout=timeout, interval=0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        self._err.close()


class Fleet:
    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.hosts: list[HostProc] = []

    def spawn(self, dsn: str, **env: str) -> HostProc:
        host = HostProc(dsn, {**self.env, **env}, self.tmp_path / f"host{len(self.hosts)}.err")
        self.hosts.append(host)
        return host

    async def start(self, dsn: str, **env: str) -> HostProc:
        host = self.spawn(dsn, **env)
        await host.ready()
        return host

    def by_pid(self, pid: int) -> HostProc:
        return next(h for h in self.hosts if h.pid == pid)

    def close(self) -> None:
        for host in self.hosts:
            host.stop()
        for i, host in enumerate(self.hosts):
            tail = host.stderr().splitlines()[-15:]
            if tail:  # shown by pytest when the test failed
                print(f"--- host{i} (pid {host.pid}) stderr, last lines:", *tail, sep="\n")


@pytest.fixture
def fleet(pg_cluster: Cluster, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, {"JOBS_LIMIT": "5", "JOBS_SLEEP": "0.01"})
    yield f
    f.close()  # before the cluster goes


# --------------------------------------------------------------------------------------------
# Database helpers and the producer


async def prepare(dsn: str) -> asyncpg.Connection:
    await bl.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await conn.execute(TABLES)
    await conn.execute("CREATE TABLE produced (item_id bigint PRIMARY KEY)")
    return conn


async def fetchval(dsn: str, query: str, *args: Any) -> Any:
    """On a fresh connection: for checks made while the server may have restarted."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def first_commit_after(conn: Any, t0: dt.datetime, min_generation: int = 0) -> Any:
    return await conn.fetchval(
        "SELECT min(pg_xact_commit_timestamp(xmin)) FROM done "
        "WHERE pg_xact_commit_timestamp(xmin) > $1 AND generation >= $2",
        t0,
        min_generation,
    )


async def owner_pid(conn: Any, name: str) -> int | None:
    st = await bl.status(conn, name)
    return st.owner.pid if st and st.owner else None


async def generation(conn: Any, name: str) -> int:
    return int(
        await conn.fetchval("SELECT generation FROM batchloop.worker_state WHERE name = $1", name)
    )


async def db_now(conn: Any) -> dt.datetime:
    now: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
    return now


class Producer:
    """Inserts items for ``names`` in turn and pings, one transaction each, until stopped.

    Connection errors (the server restarting or unreachable) are counted and retried on a new
    connection. Each insert also records its item ids in ``produced`` in the same transaction,
    so a commit whose acknowledgement was lost is still accounted for.
    """

    def __init__(
        self,
        dsn: str,
        names: Sequence[str],
        *,
        per_insert: int = 2,
        pace: float = 0.02,
        config: bl.Config | None = None,
    ) -> None:
        self.dsn, self.names, self.per_insert = dsn, list(names), per_insert
        self.pace, self.config = pace, config
        self.commits: list[float] = []  # time.monotonic() of each acknowledged commit
        self.errors: list[str] = []

    def commits_since(self, t: float) -> int:
        return sum(1 for c in self.commits if c > t)

    async def run(self, stop: anyio.Event) -> None:
        conn: asyncpg.Connection | None = None
        turn = 0
        try:
            while not stop.is_set():
                name = self.names[turn % len(self.names)]
                turn += 1
                try:
                    if conn is None:
                        conn = await asyncpg.connect(self.dsn, timeout=2)
                    async with conn.transaction():
                        await conn.execute(
                            "WITH i AS (INSERT INTO items (name, value) "
                            "SELECT $1, g FROM generate_series(1, $2) g RETURNING id) "
                            "INSERT INTO produced SELECT id FROM i",
                            name,
                            self.per_insert,
                        )
                        await bl.ping(conn, name, next_items, process_items, config=self.config)
                    self.commits.append(time.monotonic())
                except CONNECTION_ERRORS as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    if conn is not None:
                        conn.terminate()
                        conn = None
                # Load pacing (and retry pacing while the server is away), not synchronisation.
                await anyio.sleep(self.pace)
        finally:
            if conn is not None:
                conn.terminate()


async def drained(dsn: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    await wait_for(lambda: fetchval(dsn, "SELECT count(*) FROM items"), expect=0, timeout=timeout)


async def assert_all_invariants(conn: Any) -> None:
    produced = int(await conn.fetchval("SELECT count(*) FROM produced"))
    assert produced > 0
    await assert_invariants(conn, produced)
    missing = await conn.fetchval(
        "SELECT count(*) FROM produced p FULL JOIN (SELECT DISTINCT item_id FROM done) d "
        "USING (item_id) WHERE p.item_id IS NULL OR d.item_id IS NULL"
    )
    assert missing == 0, "done and produced differ"
    backwards = await conn.fetch(
        """
        WITH b AS (SELECT name, generation, pg_xact_commit_timestamp(xmin) AS committed FROM done)
        SELECT name, generation, committed, prev FROM (
            SELECT name, generation, committed,
                   max(generation) OVER (PARTITION BY name ORDER BY committed
                                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
              FROM b) t
         WHERE generation < prev
        """
    )
    assert backwards == [], f"a superseded generation committed after its successor: {backwards}"


# --------------------------------------------------------------------------------------------
# PostgreSQL restart


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart_every_host_reconnects_relistens_and_nothing_is_lost(
    pg_cluster: Cluster, fleet: Fleet, mode: str
) -> None:
    """A restart ends every session (``immediate``: a crash, then crash recovery). Each host
    must reconnect, LISTEN again and re-check at once; producers retry; every pinged item is
    processed exactly once.

    The hosts' monitor runs only every 30 s here, so after the reconnect's own re-check every
    wake-up must arrive by NOTIFY: at the end each host, alone in turn, must pick up a ping
    within seconds (the other one SIGSTOPped), which it can only do if it LISTENs again.
    """
    dsn = pg_cluster.dsn
    conn = await prepare(dsn)
    names = ["r0", "r1", "r2"]
    env = {"HOST_MONITOR_INTERVAL": "30", "JOBS_NAMES": ",".join(names)}
    hosts = [await fleet.start(dsn, **env) for _ in range(2)]
    producer = Producer(dsn, names)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run, stop)
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), expect=lambda n: n >= 30)
        await conn.close()

        await anyio.to_thread.run_sync(pg_cluster.restart, mode)
        t0 = dt.datetime.now(dt.timezone.utc)  # the server's clock: same machine
        mark = time.monotonic()
        first = await wait_for(lambda: fetchval(dsn, _FIRST_COMMIT_AFTER, t0), timeout=20)
        gap = (first - t0).total_seconds()
        print(f"\nrestart ({mode}) complete -> next committed batch: {gap:.3f} s")
        # Reconnect attempts back off exponentially, at most 5 s apart (plus jitter); a restart
        # this short is over within the first few.
        assert gap < 5.0, f"first batch {gap:.2f} s after the restart"
        # every host runs a new session: it registered again, and its heartbeat goes on
        await _heartbeats_after(dsn, hosts, t0)
        await wait_for(lambda: producer.commits_since(mark), expect=lambda n: n >= 30)
        stop.set()
    assert producer.errors, "the producer never saw the restart"
    await drained(dsn)

    conn = await asyncpg.connect(dsn)
    for h in hosts:
        assert h.alive(), h.stderr()
        assert any("reconnect" in w for w in h.warnings()), h.stderr()
    # Each host on its own must now be woken by NOTIFY (the monitor sleeps 30 s).
    for i, (h, other) in enumerate([(hosts[0], hosts[1]), (hosts[1], hosts[0])]):
        name = names[i]
        # Quiescent first: every name idle and its lock released, so the stopped host holds
        # nothing (a frozen owner is only replaced after monitor_lag, 60 s here).
        await wait_for(lambda: _quiescent(conn), timeout=15)
        other.signal(signal.SIGSTOP)
        try:
            before = await conn.fetchval("SELECT count(*) FROM done WHERE name = $1", name)
            await _insert_produced(conn, name, 1)
            await wait_for(
                lambda name=name: conn.fetchval("SELECT count(*) FROM done WHERE name = $1", name),
                expect=before + 1,
                timeout=5,
                message=f"host pid {h.pid} was not woken by NOTIFY after the restart",
            )
            pid = await conn.fetchval(
                "SELECT d.pid FROM done d WHERE name = $1 ORDER BY finished DESC LIMIT 1", name
            )
            app = await conn.fetchval(
                "SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid
            )
            assert app == f"batchloop/{h.host_id}"
        finally:
            other.signal(signal.SIGCONT)
    await assert_all_invariants(conn)
    await conn.close()


async def _heartbeats_after(dsn: str, hosts: Sequence[HostProc], t: dt.datetime) -> None:
    """Each host heartbeats after ``t``, and then again (its session is up, not just opened)."""
    ids = [h.host_id for h in hosts]

    async def beats() -> list[dt.datetime | None]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT host_id, heartbeat_at FROM batchloop.hosts WHERE host_id = ANY($1)", ids
            )
        finally:
            await conn.close()
        found = {r["host_id"]: r["heartbeat_at"] for r in rows}
        return [found.get(i) for i in ids]

    first = await wait_for(beats, expect=lambda bs: all(b and b > t for b in bs), timeout=15)
    await wait_for(
        beats, expect=lambda bs: all(b and b > f for b, f in zip(bs, first, strict=True)), timeout=5
    )


async def _quiescent(conn: Any) -> bool:
    """No name is running or waiting, and no session holds a name's lock."""
    return bool(
        await conn.fetchval(
            """
            SELECT NOT EXISTS (SELECT FROM batchloop.workers WHERE status <> 'idle')
               AND NOT EXISTS (
                   SELECT FROM pg_locks l JOIN batchloop.workers w
                       ON w.lock_key = ((l.classid::bigint << 32) | l.objid::bigint)
                    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted)
            """
        )
    )


_FIRST_COMMIT_AFTER = (
    "SELECT min(pg_xact_commit_timestamp(xmin)) FROM done WHERE pg_xact_commit_timestamp(xmin) > $1"
)


async def _insert_produced(
    conn: Any, name: str, count: int, config: bl.Config | None = None
) -> None:
    async with conn.transaction():
        await conn.execute(
            "WITH i AS (INSERT INTO items (name, value) "
            "SELECT $1, g FROM generate_series(1, $2) g RETURNING id) "
            "INSERT INTO produced SELECT id FROM i",
            name,
            count,
        )
        await bl.ping(conn, name, next_items, process_items, config=config)


# --------------------------------------------------------------------------------------------
# A work connection killed mid-batch

_KILL_WORK_CONN = """
SELECT count(pg_terminate_backend(a.pid))
  FROM pg_stat_activity a
 WHERE a.application_name = $1
   AND a.state = 'idle in transaction'      -- the worker is sleeping mid-batch, after its writes
   AND a.query LIKE 'DELETE FROM items%'
   AND a.pid NOT IN (                       -- never the control connection (it holds the lock)
       SELECT l.pid FROM pg_locks l JOIN batchloop.workers w
           ON w.lock_key = ((l.classid::bigint << 32) | l.objid::bigint)
        WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted)
"""


async def test_work_connection_killed_mid_batch_rolls_back_and_retries(
    pg_cluster: Cluster, fleet: Fleet
) -> None:
    dsn = pg_cluster.dsn
    conn = await prepare(dsn)
    env = {"JOBS_NAMES": "k", "JOBS_SLEEP": "0.1"}
    await fleet.start(dsn, **env)
    await fleet.start(dsn, **env)
    await _insert_produced(conn, "k", 100)
    producer = Producer(dsn, ["k"], pace=0.05)
    stop = anyio.Event()
    gaps = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run, stop)
        for _ in range(3):
            owner = await wait_for(lambda: _owner(conn, "k"), message="nobody owns k")
            gen = await generation(conn, "k")
            killed = await wait_for(
                lambda owner=owner: conn.fetchval(_KILL_WORK_CONN, f"batchloop/{owner.host_id}"),
                timeout=10,
                message="no work connection caught mid-batch",
            )
            assert killed == 1
            t_kill = await db_now(conn)
            first = await wait_for(lambda t=t_kill: first_commit_after(conn, t), timeout=10)
            gaps.append((first - t_kill).total_seconds())
            st = await bl.status(conn, "k")
            assert st is not None and st.last_error is not None, "the failure was not recorded"
            assert st.last_error_at is not None and st.last_error_at >= t_kill - _EPS
            assert "onnection" in st.last_error or "terminat" in st.last_error, st.last_error
            # The control connection survived, so the same loop (generation) retried.
            assert await generation(conn, "k") == gen
            assert st.owner is not None and st.owner.host_id == owner.host_id
        stop.set()
    print(f"\nwork connection killed mid-batch -> next committed batch (s): {gaps}")
    assert max(gaps) < 2.0, gaps  # the first retry comes within 1 s, plus the batch itself
    await drained(dsn)
    await assert_all_invariants(conn)
    st = await bl.status(conn, "k")
    assert st is not None and st.consecutive_failures == 0
    await conn.close()


async def _owner(conn: Any, name: str) -> Any:
    st = await bl.status(conn, name)
    return st.owner if st else None


# --------------------------------------------------------------------------------------------
# Half-open (frozen) connections and cut connections, through a TCP proxy


async def test_half_open_owner_is_taken_over_and_fenced(pg_cluster: Cluster, fleet: Fleet) -> None:
    """The owner's every connection goes silent (a partition, not a crash): its sockets stay
    open, so the server keeps its session lock and its open iteration's row lock.

    Detection is bounded by the heartbeat: the owner refreshes ``hosts.heartbeat_at`` every
    min(1 s, monitor_lag / 4); another host's monitor (every 0.5 s) sees it older than the
    name's ``monitor_lag``, terminates the owner's backends (freeing both locks) and claims. The
    frozen host itself notices only when a control statement exceeds its 5 s statement
    timeout. After the partition heals, its old generation must commit nothing.
    """
    lag = 3.0
    config = bl.Config(monitor_lag=lag)
    dsn = pg_cluster.dsn
    conn = await prepare(dsn)
    # A long cooldown: the precondition below (the proxied host still owns the name when the
    # partition starts) must not depend on the producer's first ping beating a short cooldown
    # on a loaded machine; with the default 0.3 s the loop sometimes went idle first.
    env = {"JOBS_NAMES": "h", "JOBS_LIMIT": "2", "JOBS_SLEEP": "0.02", "JOBS_COOLDOWN": "30"}
    with Proxy(pg_cluster.port) as proxy:
        frozen = await fleet.start(proxy.dsn(dsn), **env)
        await _insert_produced(conn, "h", 20, config)
        await wait_for(lambda: owner_pid(conn, "h"), expect=frozen.pid)
        direct = await fleet.start(dsn, **env)
        producer = Producer(dsn, ["h"], pace=0.03, config=config)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer.run, stop)
            await wait_for(
                lambda: conn.fetchval("SELECT count(*) FROM done"), expect=lambda n: n >= 20
            )
            old_gen = await generation(conn, "h")
            proxy.freeze()
            t0 = await db_now(conn)
            # still the proxied host's loop, at the generation we fence against
            assert await owner_pid(conn, "h") == frozen.pid
            assert await generation(conn, "h") == old_gen
            first = await wait_for(
                lambda: first_commit_after(conn, t0, old_gen + 1), timeout=lag + 10
            )
            gap = (first - t0).total_seconds()
            print(f"\nhalf-open owner taken over after {gap:.2f} s (monitor_lag {lag} s)")
            assert gap < lag + 3.0, f"half-open owner taken over after {gap:.2f} s"
            assert await owner_pid(conn, "h") == direct.pid
            proxy.resume()
            resumed = await db_now(conn)
            # The healed host finds its sessions ended (and its host row forgotten by the host
            # that took over) and comes back as a fresh session, heartbeating again.
            await wait_for(
                lambda: conn.fetchval(
                    "SELECT heartbeat_at > $2 FROM batchloop.hosts WHERE host_id = $1",
                    frozen.host_id,
                    resumed,
                ),
                timeout=20,
                message="the healed host did not come back",
            )
            stop.set()
        await drained(dsn)
    assert frozen.alive() and direct.alive()
    # Nothing the partitioned owner had in flight (bytes held by the proxy included) may commit
    # once it is frozen, before or after the takeover.
    late = await conn.fetchval(
        "SELECT count(*) FROM done WHERE generation <= $1 AND pg_xact_commit_timestamp(xmin) > $2",
        old_gen,
        t0,
    )
    assert late == 0, "the partitioned host committed with its old generation"
    await assert_all_invariants(conn)
    await conn.close()


async def test_owner_cut_off_is_taken_over_by_another_host_within_a_second(
    pg_cluster: Cluster, fleet: Fleet
) -> None:
    """Every connection of the owner is reset (the server sees them close, so its session locks
    go at once) and it cannot reconnect for now: another host must claim within about a
    second, whatever ``monitor_lag`` (60 s here) is. Then the owner may come back."""
    dsn = pg_cluster.dsn
    conn = await prepare(dsn)
    env = {"JOBS_NAMES": "c", "JOBS_LIMIT": "2", "JOBS_SLEEP": "0.02"}
    with Proxy(pg_cluster.port) as proxy:
        proxied = await fleet.start(proxy.dsn(dsn), **env)
        await _insert_produced(conn, "c", 20)
        await wait_for(lambda: owner_pid(conn, "c"), expect=proxied.pid)
        direct = await fleet.start(dsn, **env)
        producer = Producer(dsn, ["c"], pace=0.03)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer.run, stop)
            await wait_for(
                lambda: conn.fetchval("SELECT count(*) FROM done"), expect=lambda n: n >= 20
            )
            old_gen = await generation(conn, "c")
            proxy.freeze()  # new connections hang: the owner cannot reconnect meanwhile
            assert proxy.cut() >= 2  # the control connection and at least one pool connection
            t0 = await db_now(conn)
            first = await wait_for(lambda: first_commit_after(conn, t0, old_gen + 1), timeout=10)
            gap = (first - t0).total_seconds()
            print(f"\nowner cut off, taken over by another host after {gap:.2f} s")
            assert gap < 1.5, f"cut-off owner taken over after {gap:.2f} s"
            assert await owner_pid(conn, "c") == direct.pid
            proxy.resume()
            resumed = await db_now(conn)
            await wait_for(
                lambda: conn.fetchval(
                    "SELECT heartbeat_at > $2 FROM batchloop.hosts WHERE host_id = $1",
                    proxied.host_id,
                    resumed,
                ),
                timeout=20,
                message="the cut-off host did not come back",
            )
            stop.set()
        await drained(dsn)
    assert proxied.alive()
    late = await conn.fetchval(
        "SELECT count(*) FROM done WHERE generation <= $1 AND pg_xact_commit_timestamp(xmin) > $2",
        old_gen,
        t0,
    )
    assert late == 0, "the cut-off host committed with its old generation"
    await assert_all_invariants(conn)
    await conn.close()


# --------------------------------------------------------------------------------------------
# Database unreachable


async def test_host_started_while_database_is_down_retries_then_works(
    pg_cluster: Cluster, fleet: Fleet
) -> None:
    dsn = pg_cluster.dsn
    conn = await prepare(dsn)
    await conn.close()
    await anyio.to_thread.run_sync(pg_cluster.stop)
    host = fleet.spawn(dsn, HOST_STARTUP_TIMEOUT="none", JOBS_NAMES="u")
    bounded = fleet.spawn(dsn, HOST_STARTUP_TIMEOUT="1", JOBS_NAMES="u")
    # Both retry, saying so on stderr; the bounded one gives up after its startup_timeout.
    await wait_for(lambda: host.warnings(), timeout=10, message="no retry warning")
    await wait_for(lambda: bounded.proc.poll(), expect=lambda rc: rc not in (None, 0), timeout=10)
    assert bounded.warnings() and "cannot connect to PostgreSQL" in bounded.stderr()
    assert host.host_id is None and host.alive()
    await anyio.to_thread.run_sync(pg_cluster.start)
    t0 = time.monotonic()
    await host.ready(timeout=15)
    print(f"\nhost ready {time.monotonic() - t0:.2f} s after the database came up")
    conn = await asyncpg.connect(dsn)
    await _insert_produced(conn, "u", 50)
    await drained(dsn, timeout=10)
    await assert_all_invariants(conn)
    await conn.close()


async def test_database_down_for_3_s_host_survives_and_drains(
    pg_cluster: Cluster, fleet: Fleet
) -> None:
    dsn = pg_cluster.dsn
    conn = await prepare(dsn)
    host = await fleet.start(dsn, JOBS_NAMES="d", JOBS_LIMIT="2", JOBS_SLEEP="0.02")
    producer = Producer(dsn, ["d"], pace=0.02)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run, stop)
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), expect=lambda n: n >= 10)
        await conn.close()
        warned = len(host.warnings())
        await anyio.to_thread.run_sync(pg_cluster.stop)
        down = time.monotonic()
        # The outage lasts 3 s, and the host must have noticed it (and be retrying).
        await wait_for(
            lambda: len(host.warnings()) > warned + 1 and time.monotonic() - down >= 3.0,
            timeout=15,
        )
        assert host.alive(), host.stderr()
        await anyio.to_thread.run_sync(pg_cluster.start)
        up = time.monotonic()
        t_up = dt.datetime.now(dt.timezone.utc)  # the server's clock: same machine
        first = await wait_for(lambda: fetchval(dsn, _FIRST_COMMIT_AFTER, t_up), timeout=20)
        gap = (first - t_up).total_seconds()
        print(f"\ndatabase back after a 3 s outage -> next committed batch: {gap:.2f} s")
        await wait_for(lambda: producer.commits_since(up), expect=lambda n: n >= 20, timeout=20)
        stop.set()
    await drained(dsn)
    assert host.alive(), host.stderr()
    assert "CRITICAL" not in host.stderr()
    conn = await asyncpg.connect(dsn)
    await assert_all_invariants(conn)
    await conn.close()


# --------------------------------------------------------------------------------------------
# A tiny pool for many names


async def test_tiny_pool_many_names_drains_without_crash(pg_cluster: Cluster, fleet: Fleet) -> None:
    dsn = pg_cluster.dsn
    conn = await prepare(dsn)
    names = [f"p{i:02d}" for i in range(20)]
    host = await fleet.start(
        dsn, HOST_POOL_MAX="2", JOBS_NAMES=",".join(names), JOBS_LIMIT="3", JOBS_SLEEP="0.005"
    )
    for name in names:
        await _insert_produced(conn, name, 10)
    producer = Producer(dsn, names, per_insert=3, pace=0.005)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run, stop)
        # many loops at once, all contending for the two pool connections
        owning = await wait_for(
            lambda: _owned_by(conn, host.host_id), expect=lambda n: n >= 15, timeout=20
        )
        await wait_for(
            lambda: conn.fetchval("SELECT count(DISTINCT name) FROM done"),
            expect=len(names),
            timeout=20,
        )
        await wait_for(lambda: len(producer.commits), expect=lambda n: n >= 100, timeout=20)
        stop.set()
    await drained(dsn, timeout=30)
    assert host.alive(), host.stderr()
    assert "CRITICAL" not in host.stderr() and "Traceback" not in host.stderr(), host.stderr()
    backends = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
        f"batchloop/{host.host_id}",
    )
    assert backends <= 3, f"{backends} backends: the pool (2) plus the control connection"
    print(f"\n{owning} names running at once on a pool of 2")
    await assert_all_invariants(conn)
    await conn.close()


async def _owned_by(conn: Any, host_id: str | None) -> int:
    return sum(
        1 for w in await bl.list_workers(conn) if w.owner is not None and w.owner.host_id == host_id
    )
