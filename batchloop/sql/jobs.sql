-- Named queries of batchloop.jobs (migrations/0007_jobs.sql). Every write to a running job is
-- fenced by its attempt number: "status = 'running' AND attempts = <the attempt's>".
-- "Final" statuses: completed, failed, canceled.

-- name: jobs_insert
-- $1 type, $2 queue, $3 payload (JSON text), $4 key, $5 max_attempts, $6 lease (s),
-- $7 run_at (NULL: now() + $8 seconds), $9 whether the type has an on_complete.
-- $10..$15: the ping of the queue's loop (see ping in queries.sql), in the same statement:
-- one round trip per dispatch. A key already taken makes this return no row (after waiting for
-- an uncommitted first insert), and pings nothing.
WITH ins AS (
    INSERT INTO {schema}.jobs (type, queue, payload, key, max_attempts, lease_seconds, run_at,
                               on_complete)
    VALUES ($1, $2, $3::text::jsonb, $4::text, $5::integer, $6::float8,
            coalesce($7::timestamptz, now() + make_interval(secs => $8::float8)), $9::boolean)
    ON CONFLICT (type, key) WHERE key IS NOT NULL DO NOTHING
    RETURNING id
)
SELECT ins.id,
       (SELECT {schema}.ping($10, $11, $12, $13::jsonb, $14::jsonb, $15::integer)) AS pinged
  FROM ins

-- name: jobs_by_key
SELECT id FROM {schema}.jobs WHERE type = $1 AND key = $2::text

-- name: jobs_insert_many
-- $1 type, $2 queue, $3 payloads (JSON texts), $4 max_attempts, $5 lease, $6 run_at, $7 delay,
-- $8 on_complete; $9..$14 the queue's ping, as in jobs_insert. Ids come back in the payloads'
-- order (the identity's sequence runs in that order).
WITH ins AS (
    INSERT INTO {schema}.jobs (type, queue, payload, max_attempts, lease_seconds, run_at,
                               on_complete)
    SELECT $1, $2, u.p::jsonb, $4::integer, $5::float8,
           coalesce($6::timestamptz, now() + make_interval(secs => $7::float8)), $8::boolean
      FROM unnest($3::text[]) WITH ORDINALITY AS u(p, n)
     ORDER BY u.n
    RETURNING id
)
SELECT ins.id,
       (SELECT {schema}.ping($9, $10, $11, $12::jsonb, $13::jsonb, $14::integer)) AS pinged
  FROM ins

-- name: jobs_due
-- The queue's work query. $1 queue, $2 the types this process runs, $3 concurrency.
-- busy: live leases (they hold slots, wherever their handlers run), expiry_in: seconds to the
-- first live lease's end; due: pending jobs whose
-- run_at passed and expired leases, up to the free slots; ending: cancels to record (they take
-- no slot). Types this process does not run are never leased here.
WITH busy AS (
    SELECT count(*)::integer AS n FROM {schema}.jobs
     WHERE queue = $1 AND status = 'running' AND lease_until > now()
)
SELECT busy.n AS busy,
       extract(epoch FROM (SELECT min(lease_until) FROM {schema}.jobs
                            WHERE queue = $1 AND status = 'running'
                              AND lease_until > now()) - now())::float8 AS expiry_in,
       ARRAY(SELECT d.id FROM (
                (SELECT id, run_at AS due_at FROM {schema}.jobs
                  WHERE queue = $1 AND status = 'pending' AND run_at <= now()
                    AND NOT cancel_requested AND type = ANY($2::text[])
                  ORDER BY run_at LIMIT greatest($3::integer - busy.n, 0))
                UNION ALL
                (SELECT id, lease_until FROM {schema}.jobs
                  WHERE queue = $1 AND status = 'running' AND lease_until <= now()
                    AND NOT cancel_requested AND type = ANY($2::text[])
                  ORDER BY lease_until LIMIT greatest($3::integer - busy.n, 0))
             ) d ORDER BY d.due_at LIMIT greatest($3::integer - busy.n, 0)) AS due,
       ARRAY(SELECT id FROM {schema}.jobs
              WHERE queue = $1 AND cancel_requested AND type = ANY($2::text[])
                AND (status = 'pending' OR (status = 'running' AND lease_until <= now()))
              LIMIT 100) AS ending
  FROM busy

-- name: jobs_next
-- When nothing is due: seconds until the next run_at, live lease's end and retention sweep
-- ($1 queue, $2 types this process runs, $3 retention in seconds); sweep: one is due now.
SELECT extract(epoch FROM (SELECT min(run_at) FROM {schema}.jobs
                            WHERE queue = $1 AND status = 'pending'
                              AND type = ANY($2::text[])) - now())::float8 AS run_in,
       extract(epoch FROM (SELECT min(lease_until) FROM {schema}.jobs
                            WHERE queue = $1 AND status = 'running'
                              AND lease_until > now()) - now())::float8 AS expiry_in,
       extract(epoch FROM (SELECT min(completed_at) FROM {schema}.jobs
                            WHERE queue = $1 AND status IN ('completed', 'failed', 'canceled'))
                          + make_interval(secs => $3::float8) - now())::float8 AS sweep_in

-- name: jobs_lease
-- The queue's worker: lease $1 (ids from jobs_due) in one statement: a job still due becomes
-- running with its attempt counted; a requested cancel is recorded (canceled), and so is an
-- expired lease that used the last attempt (failed). Rows locked by someone else (a cancel in
-- flight) are skipped: the next iteration sees them.
WITH d AS (
    SELECT id, cancel_requested OR (status = 'running' AND attempts >= max_attempts) AS ends
      FROM {schema}.jobs
     WHERE id = ANY($1::bigint[])
       AND ((status = 'pending' AND (run_at <= now() OR cancel_requested))
            OR (status = 'running' AND lease_until <= now()))
       FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs j
   SET status = CASE WHEN j.cancel_requested THEN 'canceled'
                     WHEN d.ends THEN 'failed' ELSE 'running' END,
       attempts = j.attempts + CASE WHEN d.ends THEN 0 ELSE 1 END,
       started_at = CASE WHEN d.ends THEN j.started_at ELSE now() END,
       lease_until = CASE WHEN d.ends THEN NULL
                          ELSE now() + make_interval(secs => j.lease_seconds) END,
       progress = CASE WHEN d.ends THEN j.progress ELSE 0 END,
       completed_at = CASE WHEN d.ends THEN now() END,
       error = CASE WHEN j.cancel_requested OR NOT d.ends THEN j.error
                    ELSE 'lease expired on attempt ' || j.attempts || ' of ' || j.max_attempts
                         || ' (its host died or stalled); no attempts left' END
  FROM d
 WHERE j.id = d.id
RETURNING j.*

-- name: jobs_complete
-- Record finished attempts of one queue, in one statement: $1 ids, $2 attempts, $3 outcomes
-- ('ok', 'retry', 'fail'), $4 results (JSON texts), $5 errors, $6 retry delays (s). Only rows
-- still running that attempt change (the fence); the others' outcomes are stale, dropped.
-- $7..$12: the ping of the queue's loop (see ping in queries.sql), in the same statement, so
-- a loop that went to sleep leases the freed slots (a no-op, writing nothing, while it runs).
WITH done AS (
    UPDATE {schema}.jobs j
       SET status = {schema}.jobs_next_status(j.cancel_requested, c.outcome, j.attempts,
                                               j.max_attempts),
           result = CASE WHEN c.outcome = 'ok' THEN c.result::jsonb ELSE j.result END,
           error = CASE WHEN c.outcome = 'ok' THEN NULL ELSE c.error END,
           progress = CASE WHEN c.outcome = 'ok' AND NOT j.cancel_requested THEN 100
                           ELSE j.progress END,
           run_at = CASE WHEN {schema}.jobs_next_status(j.cancel_requested, c.outcome,
                                                         j.attempts, j.max_attempts) = 'pending'
                         THEN now() + make_interval(secs => c.delay) ELSE j.run_at END,
           lease_until = NULL,
           completed_at = CASE WHEN {schema}.jobs_next_status(j.cancel_requested, c.outcome,
                                                               j.attempts, j.max_attempts)
                                    = 'pending'
                               THEN NULL ELSE now() END
      FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[], $5::text[],
                  $6::float8[]) AS c(id, attempt, outcome, result, error, delay)
     WHERE j.id = c.id AND j.status = 'running' AND j.attempts = c.attempt
    RETURNING j.*
)
SELECT done.*,
       (SELECT {schema}.ping($7, $8, $9, $10::jsonb, $11::jsonb, $12::integer)) AS pinged
  FROM done

-- name: jobs_extend
-- Extend the leases of running attempts ($1 ids, $2 attempts); returns those still ours.
UPDATE {schema}.jobs j
   SET lease_until = now() + make_interval(secs => j.lease_seconds)
  FROM unnest($1::bigint[], $2::integer[]) AS c(id, attempt)
 WHERE j.id = c.id AND j.status = 'running' AND j.attempts = c.attempt
RETURNING j.id, j.cancel_requested

-- name: jobs_release
-- Attempts this host gives up (shutting down): their leases end now, so the queue's loop,
-- wherever it runs, leases them again at once.
UPDATE {schema}.jobs j
   SET lease_until = now()
  FROM unnest($1::bigint[], $2::integer[]) AS c(id, attempt)
 WHERE j.id = c.id AND j.status = 'running' AND j.attempts = c.attempt
RETURNING j.id

-- name: jobs_progress
-- $1 id, $2 attempt, $3 progress; the row (cancel_requested) if still this attempt's.
UPDATE {schema}.jobs SET progress = $3::smallint
 WHERE id = $1 AND status = 'running' AND attempts = $2
RETURNING cancel_requested

-- name: jobs_cancel_requested
-- $1 id, $2 attempt: whether a cancel was requested (no row: the attempt lost its lease).
SELECT cancel_requested FROM {schema}.jobs
 WHERE id = $1 AND status = 'running' AND attempts = $2

-- name: jobs_sweep
-- Delete at most $3 finished jobs of queue $1 older than $2 seconds; how many went.
WITH old AS (
    SELECT id FROM {schema}.jobs
     WHERE queue = $1 AND status IN ('completed', 'failed', 'canceled')
       AND completed_at < now() - make_interval(secs => $2::float8)
     ORDER BY completed_at LIMIT $3::integer
       FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {schema}.jobs j USING old WHERE j.id = old.id RETURNING 1
)
SELECT count(*)::integer FROM gone

-- name: jobs_get
SELECT * FROM {schema}.jobs WHERE id = $1

-- name: jobs_list
-- $1 queue, $2 type, $3 status (each NULL: any), $4 limit; newest first.
SELECT * FROM {schema}.jobs
 WHERE ($1::text IS NULL OR queue = $1::text) AND ($2::text IS NULL OR type = $2::text)
   AND ($3::text IS NULL OR status = $3::text)
 ORDER BY id DESC LIMIT $4::integer

-- name: jobs_lock
-- The job $1, locked for a cancel or a retry.
SELECT * FROM {schema}.jobs WHERE id = $1 FOR UPDATE

-- name: jobs_cancel_now
-- A pending job canceled at once ($1 id): it never runs.
UPDATE {schema}.jobs
   SET status = 'canceled', completed_at = now(), cancel_requested = true
 WHERE id = $1 AND status = 'pending'
RETURNING *

-- name: jobs_request_cancel
-- A running job (or a pending one whose on_complete this process cannot run): the flag that
-- ctx.cancelled() reads and that the queue's loop records.
UPDATE {schema}.jobs SET cancel_requested = true
 WHERE id = $1 AND status IN ('pending', 'running')
RETURNING *

-- name: jobs_retry
-- A failed or canceled job ($1) back to pending, attempts 0; its last error is kept.
UPDATE {schema}.jobs
   SET status = 'pending', attempts = 0, run_at = now(), cancel_requested = false,
       progress = 0, result = NULL, lease_until = NULL, started_at = NULL, completed_at = NULL
 WHERE id = $1 AND status IN ('failed', 'canceled')
RETURNING *

-- name: jobs_counts
-- Jobs per queue and status ($1 queue, NULL: every queue).
SELECT queue, status, count(*)::bigint AS n FROM {schema}.jobs
 WHERE $1::text IS NULL OR queue = $1::text
 GROUP BY queue, status ORDER BY queue, status

-- name: jobs_leased
-- Which of a lease's rows ($1 ids, $2 attempts, $3 started_at: the leasing transaction's now())
-- that lease holds: after a COMMIT whose outcome is unknown (the connection broke), these are
-- the ones it committed. started_at tells it from a later lease of the same attempt number.
SELECT j.id FROM {schema}.jobs j
  JOIN unnest($1::bigint[], $2::integer[], $3::timestamptz[]) AS c(id, attempt, started_at)
    ON j.id = c.id AND j.attempts = c.attempt AND j.started_at = c.started_at
 WHERE j.status = 'running'
