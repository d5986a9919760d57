-- batchloop schema, version 5: steering. ping says 'stopped' when a stopped worker ignored
-- it; wake_worker runs a name now (clearing a backoff or a debounce); record_failure stops a
-- worker after Config.max_failures consecutive failures, fenced by the generation like a stop.

CREATE OR REPLACE FUNCTION ping(p_name text, p_work_query text, p_worker text, p_config jsonb,
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
