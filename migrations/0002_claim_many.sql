-- batchloop schema, version 2: claims in batches.
-- A host that hears of many names at once (a burst of pings, a monitor tick finding orphans, its
-- loops going idle) claims them, and releases the names it let go, in one statement and one
-- commit instead of a round trip and a WAL flush each.

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
