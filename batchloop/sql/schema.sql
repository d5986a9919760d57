-- The batchloop schema after migration 0007 (jobs): what migrations/0001 to 0007 make,
-- in one file, to read (tests/test_sql.py checks that both make the same catalog). A new
-- migration changes this file too. `batchloop sql` prints it, wrapped as the runner applies a
-- migration; `batchloop migrate` applies the migrations themselves.
-- Runs with search_path set to the target schema; functions pin it with SET search_path FROM CURRENT.
-- Lock order everywhere: worker_state row before workers row (avoids deadlocks between
-- ping, the loop, stop/start and claims).

-- Rarely written: one row per name (callables, config, run status).
CREATE TABLE workers (
    name        text PRIMARY KEY CHECK (char_length(name) BETWEEN 1 AND 200),
    lock_key    bigint NOT NULL,   -- session advisory lock held by the owning host's control connection
    wake_key    bigint NOT NULL,   -- transaction advisory lock: ping (shared) vs go-idle (exclusive)
    work_query  text NOT NULL,     -- "module:qualname", resolved only through the in-process registry
    worker      text NOT NULL,
    config      jsonb NOT NULL,
    status      text NOT NULL CHECK (status IN ('idle', 'waiting', 'running', 'stopped')),
    revision    bigint NOT NULL DEFAULT 1,  -- bumped when callables or config change
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The monitor's query reads only the names that can need an owner: idle workers cost it nothing.
CREATE INDEX workers_active ON workers (name) WHERE status IN ('running', 'waiting');

-- High churn: written by every committed iteration. Low fillfactor keeps updates HOT.
CREATE TABLE worker_state (
    name                  text PRIMARY KEY REFERENCES workers (name) ON DELETE CASCADE,
    generation            bigint NOT NULL DEFAULT 0,
    owner_host            text,
    next_run_at           timestamptz,
    last_work_at          timestamptz,
    prev_work_at          timestamptz,  -- last_work_at before the open iteration's bookkeeping
    batches               bigint NOT NULL DEFAULT 0,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    last_error            text,
    last_error_at         timestamptz,
    -- = workers.revision (kept equal by the trigger mirror_revision): an iteration's book_batch
    -- tests it on the row it locks, which PostgreSQL re-reads after waiting for that lock.
    revision              bigint NOT NULL DEFAULT 1,
    -- True while the loop's last iteration found no work (it polls until its cooldown ends):
    -- ping then NOTIFYs the owner ('c'), which runs the loop at once instead of at its next poll.
    cooling               boolean NOT NULL DEFAULT false
) WITH (fillfactor = 50);

-- One row per live Host process; heartbeat_at is refreshed about once a second.
CREATE TABLE hosts (
    host_id       text PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    owned         integer NOT NULL DEFAULT 0  -- names owned at the last heartbeat (even shares)
) WITH (fillfactor = 50);

-- lock_key() and channel() have the schema's name written in as a literal: a SQL function with
-- `SET search_path` cannot be inlined, and saves and restores the setting on every call.
DO $$
BEGIN
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION lock_key(p_kind text, p_name text) RETURNS bigint
        LANGUAGE sql IMMUTABLE AS $b$
            SELECT ('x' || left(md5(p_kind || ':' || %L || ':' || p_name), 16))::bit(64)::bigint
        $b$
    $f$, current_schema());
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION channel() RETURNS text
        LANGUAGE sql IMMUTABLE AS $b$ SELECT %L $b$
    $f$, 'batchloop:' || current_schema());
END $$;

-- Raises when the calling code is older than the schema.
CREATE FUNCTION check_version(p_code_version integer) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE v integer := schema_version();  -- an IMMUTABLE constant the migration runner rewrites
BEGIN
    IF v > p_code_version THEN
        RAISE EXCEPTION 'batchloop schema "%" is at version %, newer than this code (version %): upgrade batchloop',
            current_schema(), v, p_code_version USING ERRCODE = 'BLNEW';
    END IF;
END $$;

-- ping: called in the inserting transaction. See batchloop/protocol.py for why it cannot lose a wakeup.
CREATE FUNCTION ping(p_name text, p_work_query text, p_worker text, p_config jsonb,
                     p_default_config jsonb, p_code_version integer) RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    read_committed boolean := current_setting('transaction_isolation') = 'read committed';
    w workers%ROWTYPE;
    changed boolean;
    cfg jsonb;
    deadline timestamptz;
BEGIN
    PERFORM check_version(p_code_version);
    -- Excludes a concurrent go-idle step until this transaction ends. Each statement below takes a
    -- fresh snapshot (volatile function, READ COMMITTED), so it sees a go-idle that committed
    -- while we waited for this lock.
    PERFORM pg_advisory_xact_lock_shared(lock_key('wake', p_name));
    IF read_committed THEN
        SELECT * INTO w FROM workers WHERE name = p_name;
    ELSE
        -- The transaction snapshot may predate a go-idle; locking the row makes PostgreSQL raise a
        -- serialization failure (40001) instead of letting us trust a stale status.
        SELECT * INTO w FROM workers WHERE name = p_name FOR SHARE;
    END IF;

    IF NOT FOUND THEN
        cfg := coalesce(p_config, p_default_config);
        INSERT INTO workers (name, lock_key, wake_key, work_query, worker, config, status)
        VALUES (p_name, lock_key('own', p_name), lock_key('wake', p_name), p_work_query, p_worker, cfg, 'running')
        ON CONFLICT (name) DO NOTHING;
        IF FOUND THEN
            INSERT INTO worker_state (name, next_run_at, last_work_at)
            VALUES (p_name, now() + make_interval(secs => (cfg->>'debounce')::float8), now());
            PERFORM pg_notify(channel(), 'w:' || lock_key('own', p_name) || ':' || p_name);
            RETURN 'created';
        END IF;
        -- Lost a creation race to a transaction that has committed since: read its row.
        IF read_committed THEN
            SELECT * INTO w FROM workers WHERE name = p_name;
        ELSE
            SELECT * INTO w FROM workers WHERE name = p_name FOR SHARE;
        END IF;
    END IF;

    changed := w.work_query <> p_work_query OR w.worker <> p_worker
               OR (p_config IS NOT NULL AND w.config <> p_config);
    cfg := coalesce(p_config, w.config);

    IF w.status = 'waiting' THEN
        SELECT next_run_at INTO deadline FROM worker_state WHERE name = p_name;
    END IF;

    IF w.status = 'idle' OR (w.status = 'waiting' AND (deadline IS NULL OR deadline > now() + interval '1 second')) THEN
        PERFORM 1 FROM worker_state WHERE name = p_name FOR UPDATE;
        UPDATE workers SET status = 'running', updated_at = now(),
               work_query = p_work_query, worker = p_worker, config = cfg,
               revision = revision + CASE WHEN changed THEN 1 ELSE 0 END
         WHERE name = p_name AND status IN ('idle', 'waiting');
        IF FOUND THEN
            UPDATE worker_state
               SET next_run_at = now() + make_interval(secs => (cfg->>'debounce')::float8),
                   last_work_at = now()
             WHERE name = p_name;
            PERFORM pg_notify(channel(), 'w:' || w.lock_key || ':' || p_name);
            RETURN 'woken';
        END IF;
        -- Someone else woke or stopped it meanwhile; fall through to the plain update.
    END IF;

    -- A running loop that is cooling down (its last iteration found no work, and it polls)
    -- is told at once, rather than at its next poll: only its owner acts on 'c' (see protocol.py,
    -- "Warm wake-ups"). A draining loop (cooling false) gets nothing: no write, no lock, no NOTIFY.
    IF w.status = 'running' AND (SELECT s.cooling FROM worker_state s WHERE s.name = p_name) THEN
        PERFORM pg_notify(channel(), 'c::' || p_name);
    END IF;

    IF changed THEN
        PERFORM 1 FROM worker_state WHERE name = p_name FOR UPDATE;  -- lock order: state first
        UPDATE workers SET work_query = p_work_query, worker = p_worker, config = cfg,
               revision = revision + 1, updated_at = now()
         WHERE name = p_name;
        RETURN 'updated';
    END IF;
    -- A stopped worker ignores the wakeup: say so, for the caller to notice a stop it missed.
    RETURN CASE WHEN w.status = 'stopped' THEN 'stopped' ELSE 'unchanged' END;
END $$;

-- stop: fences any in-flight loop (generation bump waits for its iteration's row lock).
-- The exclusive 'stop' lock comes first: every iteration's fence try-locks it shared, and a
-- try-lock fails while an exclusive request waits, so the loop cannot slip more batches in
-- between the in-flight one committing and this bump (row locks are not granted in order).
CREATE FUNCTION stop_worker(p_name text, p_code_version integer) RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE k bigint;
BEGIN
    PERFORM check_version(p_code_version);
    PERFORM pg_advisory_xact_lock(lock_key('stop', p_name));
    UPDATE worker_state SET generation = generation + 1, owner_host = NULL, next_run_at = NULL
     WHERE name = p_name;
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    UPDATE workers SET status = 'stopped', updated_at = now()
     WHERE name = p_name AND status <> 'stopped'
    RETURNING lock_key INTO k;
    IF NOT FOUND THEN
        RETURN 'unchanged';
    END IF;
    PERFORM pg_notify(channel(), 's:' || k || ':' || p_name);
    RETURN 'stopped';
END $$;

CREATE FUNCTION start_worker(p_name text, p_code_version integer) RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE w workers%ROWTYPE;
BEGIN
    PERFORM check_version(p_code_version);
    PERFORM 1 FROM worker_state WHERE name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    UPDATE workers SET status = 'running', updated_at = now()
     WHERE name = p_name AND status = 'stopped'
    RETURNING * INTO w;
    IF NOT FOUND THEN
        RETURN 'unchanged';
    END IF;
    UPDATE worker_state
       SET next_run_at = now() + make_interval(secs => (w.config->>'debounce')::float8),
           last_work_at = now(), consecutive_failures = 0
     WHERE name = p_name;
    PERFORM pg_notify(channel(), 'w:' || w.lock_key || ':' || p_name);
    RETURN 'started';
END $$;

-- wake: run the name's loop now (an operator's "run now"). Clears a failure backoff or a
-- debounce (next_run_at := now()), wakes an idle or waiting worker as a ping does, and notifies
-- so that the owner's sleeping loop re-reads run_in (or a host claims the name). Takes the wake
-- lock shared like ping, so a concurrent go-idle cannot undo it. Never revives a stopped one.
CREATE FUNCTION wake_worker(p_name text, p_code_version integer) RETURNS text
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE w workers%ROWTYPE;
BEGIN
    PERFORM check_version(p_code_version);
    PERFORM pg_advisory_xact_lock_shared(lock_key('wake', p_name));
    PERFORM 1 FROM worker_state WHERE name = p_name FOR UPDATE;  -- lock order: state first
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    SELECT * INTO w FROM workers WHERE name = p_name FOR UPDATE;
    IF w.status = 'stopped' THEN
        RETURN 'stopped';
    END IF;
    IF w.status <> 'running' THEN
        UPDATE workers SET status = 'running', updated_at = now() WHERE name = p_name;
    END IF;
    -- last_work_at counts the wake as work, as a ping's does: the loop polls through its cooldown.
    UPDATE worker_state SET next_run_at = now(), last_work_at = now() WHERE name = p_name;
    PERFORM pg_notify(channel(), 'w:' || w.lock_key || ':' || p_name);
    RETURN 'woken';
END $$;

-- record_failure: the loop's bookkeeping of a failed iteration, for its generation only. When
-- the count reaches the config's max_failures the worker is stopped in the same statement,
-- fenced as stop_worker is (generation bump), so a superseded loop, whose generation no longer
-- matches, can neither count nor stop. A max_failures that is not a positive integer (a
-- hand-edited row) counts as none. Returns no row when superseded.
CREATE FUNCTION record_failure(p_name text, p_generation bigint, p_error text, p_backoff float8)
RETURNS TABLE (consecutive_failures integer, stopped boolean)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    n integer;
    k bigint;
    cap integer;
BEGIN
    UPDATE worker_state s
       SET consecutive_failures = s.consecutive_failures + 1, last_error = p_error,
           last_error_at = now(), next_run_at = now() + make_interval(secs => p_backoff)
     WHERE s.name = p_name AND s.generation = p_generation
    RETURNING s.consecutive_failures INTO n;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT CASE WHEN jsonb_typeof(w.config->'max_failures') = 'number'
                 AND (w.config->>'max_failures')::numeric BETWEEN 1 AND 2147483647
                THEN (w.config->>'max_failures')::numeric::integer END, w.lock_key
      INTO cap, k
      FROM workers w WHERE w.name = p_name;
    IF cap IS NULL OR n < cap THEN
        RETURN QUERY SELECT n, false;
        RETURN;
    END IF;
    UPDATE worker_state s SET generation = s.generation + 1, owner_host = NULL, next_run_at = NULL
     WHERE s.name = p_name;
    UPDATE workers SET status = 'stopped', updated_at = now()
     WHERE name = p_name AND status <> 'stopped';
    PERFORM pg_notify(channel(), 's:' || k || ':' || p_name);
    RETURN QUERY SELECT n, true;
END $$;

-- claim: run on a host's control connection. Never blocks: a state or worker row locked by an
-- in-flight iteration or a ping's open transaction means "not now" (the monitor retries).
-- Row locks come first and the name's session lock last, and any error after taking the
-- session lock releases it (a session lock survives the statement's rollback).
CREATE FUNCTION claim(p_name text, p_host text)
RETURNS TABLE (generation bigint, status text, revision bigint, work_query text, worker text,
               config jsonb, consecutive_failures integer, run_in float8, since_work float8,
               lock_key bigint, stop_key bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    k bigint;
    st text;
BEGIN
    PERFORM 1 FROM worker_state s WHERE s.name = p_name FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT w.lock_key, w.status INTO k, st FROM workers w WHERE w.name = p_name
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR st NOT IN ('running', 'waiting') OR NOT pg_try_advisory_lock(k) THEN
        RETURN;
    END IF;
    BEGIN
        UPDATE workers w SET status = 'running', updated_at = now()
         WHERE w.name = p_name AND w.status = 'waiting'
           AND (SELECT s.next_run_at <= now() FROM worker_state s WHERE s.name = p_name);
        UPDATE worker_state s SET generation = s.generation + 1, owner_host = p_host
         WHERE s.name = p_name;
        RETURN QUERY
            SELECT s.generation, w.status, w.revision, w.work_query, w.worker, w.config,
                   s.consecutive_failures,
                   greatest(0, coalesce(extract(epoch FROM s.next_run_at - now()), 0))::float8,
                   coalesce(extract(epoch FROM now() - s.last_work_at), 1e9)::float8,
                   w.lock_key, lock_key('stop', p_name)
              FROM worker_state s JOIN workers w USING (name)
             WHERE s.name = p_name;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock(k);
        RAISE;
    END;
END $$;

-- Unlock p_unlock (session locks of names this host let go), then claim each of p_names that
-- is running or waiting as claim() does. The status is read first without locking: a name that
-- is idle or stopped (the common case when a host re-checks a name it just released) costs no
-- row lock, no xid and no WAL, and a ping that wakes it after this look NOTIFYs, which leads to
-- another claim. Session advisory locks outlive a rolled-back transaction, so if anything fails
-- half-way, the locks this call took are given back before the error propagates.
CREATE FUNCTION claim_many(p_names text[], p_host text, p_unlock bigint[])
RETURNS TABLE (name text, generation bigint, status text, revision bigint, work_query text,
               worker text, config jsonb, consecutive_failures integer, run_in float8,
               since_work float8, lock_key bigint, stop_key bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    n text;
    got bigint[] := '{}';
    r record;
BEGIN
    PERFORM pg_advisory_unlock(u) FROM unnest(p_unlock) u;
    BEGIN
        FOREACH n IN ARRAY p_names LOOP
            CONTINUE WHEN NOT EXISTS (
                SELECT FROM workers w WHERE w.name = n AND w.status IN ('running', 'waiting'));
            FOR r IN SELECT * FROM claim(n, p_host) LOOP
                got := got || r.lock_key;
                name := n;
                generation := r.generation;
                status := r.status;
                revision := r.revision;
                work_query := r.work_query;
                worker := r.worker;
                config := r.config;
                consecutive_failures := r.consecutive_failures;
                run_in := r.run_in;
                since_work := r.since_work;
                lock_key := r.lock_key;
                stop_key := r.stop_key;
                RETURN NEXT;
            END LOOP;
        END LOOP;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock(g) FROM unnest(got) g;
        RAISE;
    END;
END $$;

-- Kept equal by a trigger rather than in ping itself, so that every writer of workers.revision,
-- present or future, keeps the mirror. Such writers lock the worker_state row first (the lock
-- order everywhere), so this update never waits while holding the workers row. It fires only
-- when the revision changes: a ping that changes nothing writes nothing and locks nothing.
CREATE FUNCTION mirror_revision() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE worker_state SET revision = NEW.revision WHERE name = NEW.name;
    RETURN NULL;
END $$;

CREATE TRIGGER mirror_revision
    AFTER UPDATE OF revision ON workers
    FOR EACH ROW WHEN (NEW.revision IS DISTINCT FROM OLD.revision)
    EXECUTE FUNCTION mirror_revision();

-- batchloop.jobs: one row per job (migration 0007).
CREATE TABLE jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- no sequence grant needed
    type             text NOT NULL CHECK (char_length(type) BETWEEN 1 AND 200),
    queue            text NOT NULL CHECK (char_length(queue) BETWEEN 1 AND 195),
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'completed', 'failed', 'canceled')),
    payload          jsonb NOT NULL,
    result           jsonb,
    error            text,
    progress         smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    attempts         integer NOT NULL DEFAULT 0,   -- counted when a run starts (leased)
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    lease_seconds    double precision NOT NULL CHECK (lease_seconds > 0),
    key              text,                         -- idempotency key, unique per type
    on_complete      boolean NOT NULL DEFAULT false,  -- its type had an on_complete at dispatch
    cancel_requested boolean NOT NULL DEFAULT false,
    run_at           timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,                  -- while running: the attempt's deadline
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz
) WITH (autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_insert_scale_factor = 0.05);

-- The queue's loop reads these three with its queue first: due pending jobs, leases (live ones
-- count against the concurrency, expired ones are due again), and finished jobs to sweep.
CREATE INDEX jobs_pending ON jobs (queue, run_at) WHERE status = 'pending';
CREATE INDEX jobs_running ON jobs (queue, lease_until) WHERE status = 'running';
CREATE INDEX jobs_finished ON jobs (queue, completed_at)
    WHERE status IN ('completed', 'failed', 'canceled');
CREATE INDEX jobs_cancel ON jobs (queue) WHERE cancel_requested AND status IN ('pending', 'running');
CREATE UNIQUE INDEX jobs_key ON jobs (type, key) WHERE key IS NOT NULL;

-- A finished attempt's next status: a requested cancel wins whatever the handler did; a
-- retryable failure goes back to pending while attempts remain.
CREATE FUNCTION jobs_next_status(p_cancel boolean, p_outcome text, p_attempts integer,
                                 p_max_attempts integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_cancel THEN 'canceled'
                WHEN p_outcome = 'ok' THEN 'completed'
                WHEN p_outcome = 'retry' AND p_attempts < p_max_attempts THEN 'pending'
                ELSE 'failed' END
$$;
