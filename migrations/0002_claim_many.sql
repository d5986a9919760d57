-- batchloop schema, version 2: claims in batches.
-- A host that hears of many names at once (a burst of pings, a monitor tick finding orphans, its
-- loops going idle) claims them, and releases the names it let go, in one statement and one
-- commit instead of a round trip and a WAL flush each.

-- claim() first looks without locking: a name that is idle or stopped (the common case when a
-- host re-checks a name it just released) costs no row lock, no xid and no WAL. A ping that
-- makes it running after this look sends a NOTIFY, which leads to another claim.
CREATE OR REPLACE FUNCTION claim(p_name text, p_host text)
RETURNS TABLE (generation bigint, status text, revision bigint, work_query text, worker text,
               config jsonb, consecutive_failures integer, run_in float8, since_work float8,
               lock_key bigint, stop_key bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    k bigint;
    st text;
BEGIN
    PERFORM 1 FROM workers w WHERE w.name = p_name AND w.status IN ('running', 'waiting');
    IF NOT FOUND THEN
        RETURN;
    END IF;
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

-- Unlock p_unlock (session locks of names this host let go), then claim each of p_names as
-- claim() does. Session advisory locks outlive a rolled-back transaction, so if anything fails
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
