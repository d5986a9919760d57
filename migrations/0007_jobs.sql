-- batchloop schema, version 7: jobs (batchloop.jobs). One row per job; the loop of its queue
-- (the batchloop name 'jobs:<queue>') leases due rows in its iteration transaction, the owning
-- host runs the handlers outside any transaction, and their completions are fenced by the
-- attempt number, so a stale attempt (its lease lost) cannot overwrite a newer one.
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
