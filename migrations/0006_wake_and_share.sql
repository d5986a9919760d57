-- batchloop schema, version 6: warm wake-ups and even shares.
-- worker_state.cooling is true while a running loop's last iteration found no work (it polls
-- until its cooldown ends); the iteration's own writes keep it (book_batch clears it,
-- unbook_batch sets it: no extra statement), and ping reads it in the statement it already
-- runs, to NOTIFY the owner only then.
-- hosts.owned is how many names the host owned at its last heartbeat (which writes it): a
-- host over an even share lets the others claim new names first.

ALTER TABLE worker_state ADD COLUMN cooling boolean NOT NULL DEFAULT false;
ALTER TABLE hosts ADD COLUMN owned integer NOT NULL DEFAULT 0;

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
