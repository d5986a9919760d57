-- Named queries. "{schema}" is replaced by the quoted schema name; parameters are $1, $2, ...
-- (the psycopg driver rewrites them). Transitions with several steps live in plpgsql functions
-- (migrations/), so each call here is one round trip.

-- The calls from user transactions read the migration record first and skip their function
-- when it names a version newer than this code ($n, the code's version): a newer release's
-- migrate may leave schema_version() alone, and its functions are not ours to trust. "newest"
-- comes back for the client to refuse; CASE evaluates the call only when it is not skipped.

-- name: ping
SELECT v.newest, CASE WHEN v.newest > $6 THEN NULL
                 ELSE {schema}.ping($1, $2, $3, $4::jsonb, $5::jsonb, $6) END AS result
  FROM (SELECT max(version) AS newest FROM {schema}.schema_migrations) v

-- name: stop
SELECT v.newest, CASE WHEN v.newest > $2 THEN NULL
                 ELSE {schema}.stop_worker($1, $2) END AS result
  FROM (SELECT max(version) AS newest FROM {schema}.schema_migrations) v

-- name: start
SELECT v.newest, CASE WHEN v.newest > $2 THEN NULL
                 ELSE {schema}.start_worker($1, $2) END AS result
  FROM (SELECT max(version) AS newest FROM {schema}.schema_migrations) v

-- name: wake
SELECT v.newest, CASE WHEN v.newest > $2 THEN NULL
                 ELSE {schema}.wake_worker($1, $2) END AS result
  FROM (SELECT max(version) AS newest FROM {schema}.schema_migrations) v

-- name: check_version
-- Raises when schema_version() is newer than $1; returns the newest recorded migration.
SELECT (SELECT max(version) FROM {schema}.schema_migrations) AS newest,
       {schema}.check_version($1) AS checked

-- name: schema_version
-- The newer of schema_version() and the migration record (see above).
SELECT greatest({schema}.schema_version(),
                (SELECT max(version) FROM {schema}.schema_migrations))

-- name: status
-- owner_alive: some live session holds the name's lock (its owner's control connection).
-- stale: it should be running (running, or waiting and due) but nobody holds it.
WITH held AS (
    SELECT (classid::bigint << 32) | objid::bigint AS key
      FROM pg_locks
     WHERE locktype = 'advisory' AND objsubid = 1 AND granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT w.name, w.status, s.generation, w.work_query, w.worker, w.config::text AS config,
       s.last_work_at, s.next_run_at, s.batches, s.consecutive_failures, s.last_error,
       s.last_error_at, w.created_at, h.host_id, h.hostname, h.pid,
       w.lock_key IN (SELECT key FROM held) AS owner_alive,
       (w.status = 'running' OR (w.status = 'waiting' AND s.next_run_at <= now()))
           AND w.lock_key NOT IN (SELECT key FROM held) AS stale
  FROM {schema}.workers w
  JOIN {schema}.worker_state s USING (name)
  LEFT JOIN {schema}.hosts h
    ON h.host_id = s.owner_host AND w.lock_key IN (SELECT key FROM held)
 WHERE ($1::text IS NULL OR w.name = $1)
 ORDER BY w.name

-- name: hosts
-- alive: some backend of the host (control or pool connection; each carries its application
-- name, batchloop/<host_id>) is connected, and its heartbeat is under $1 seconds old.
-- owned: the names whose lock is held and whose state names this host.
WITH held AS (
    SELECT (classid::bigint << 32) | objid::bigint AS key
      FROM pg_locks
     WHERE locktype = 'advisory' AND objsubid = 1 AND granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT h.host_id, h.hostname, h.pid, h.started_at, h.heartbeat_at,
       h.heartbeat_at > now() - make_interval(secs => $1)
           AND EXISTS (SELECT FROM pg_stat_activity a
                        WHERE a.application_name = 'batchloop/' || h.host_id) AS alive,
       coalesce((SELECT array_agg(w.name ORDER BY w.name)
                   FROM {schema}.worker_state s JOIN {schema}.workers w USING (name)
                  WHERE s.owner_host = h.host_id AND w.lock_key IN (SELECT key FROM held)),
                '{}') AS owned
  FROM {schema}.hosts h
 ORDER BY h.started_at, h.host_id

-- Connection setup (batchloop/connect.py): no schema object, values inlined (SET takes none).

-- name: server_keepalive
-- Set after connecting, not sent as startup parameters: PgBouncer refuses a connection whose
-- startup packet carries parameters it does not know ("unsupported startup parameter").
SET tcp_keepalives_idle = $1; SET tcp_keepalives_interval = $2; SET tcp_keepalives_count = $3

-- name: reset_session
-- What asyncpg's pool resets on release, for psycopg connections too.
SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL

-- name: database
-- Which database a connection reached, to check that a host's control_dsn and dsn agree.
SELECT current_database() AS name, pg_postmaster_start_time() AS started,
       (SELECT oid FROM pg_database WHERE datname = current_database()) AS oid

-- name: claim
SELECT generation, status, revision, work_query, worker, config::text AS config,
       consecutive_failures, run_in, since_work, lock_key, stop_key
  FROM {schema}.claim($1, $2)

-- name: claim_many
-- Unlock $3 (names this host let go), then claim each of $1 that needs an owner.
SELECT name, generation, status, revision, work_query, worker, config::text AS config,
       consecutive_failures, run_in, since_work, lock_key, stop_key
  FROM {schema}.claim_many($1::text[], $2, $3::bigint[])

-- name: unlock
SELECT count(*) FILTER (WHERE pg_advisory_unlock(k)) FROM unnest($1::bigint[]) k

-- name: register_host
INSERT INTO {schema}.hosts (host_id, hostname, pid) VALUES ($1, $2, $3)
ON CONFLICT (host_id) DO UPDATE SET heartbeat_at = now()

-- name: heartbeat
-- Also publishes how many names this host owns ($2) and reads the other live hosts' counts
-- (as of their last heartbeats), for even shares: no statement of its own.
UPDATE {schema}.hosts SET heartbeat_at = now(), owned = $2 WHERE host_id = $1
RETURNING host_id,
          (SELECT count(*)::int FROM {schema}.hosts h
            WHERE h.host_id <> $1 AND h.heartbeat_at > now() - interval '10 seconds') AS others,
          (SELECT coalesce(sum(h.owned), 0)::int FROM {schema}.hosts h
            WHERE h.host_id <> $1 AND h.heartbeat_at > now() - interval '10 seconds')
            AS others_owned

-- name: orphans
-- One query per monitor tick for all names. Returns running or due-waiting workers that this
-- process can run ($2, $3: its registered refs) and whose session lock nobody holds (claim
-- them), and any whose owner's heartbeat is older than the name's monitor_lag (a frozen or
-- cut-off host: stale_owner; its backends must be terminated first). Most overdue first.
-- A monitor_lag that is not a number in Config's range (a hand-edited row) counts as the
-- default 60 s rather than failing this query, and so the monitor, for every name.
WITH held AS (
    SELECT (classid::bigint << 32) | objid::bigint AS key
      FROM pg_locks
     WHERE locktype = 'advisory' AND objsubid = 1 AND granted
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT w.name, w.work_query, w.worker,
       CASE WHEN w.lock_key IN (SELECT key FROM held) THEN s.owner_host END AS stale_owner
  FROM {schema}.workers w
  JOIN {schema}.worker_state s USING (name)
  LEFT JOIN {schema}.hosts h ON h.host_id = s.owner_host
 WHERE (w.status = 'running' OR (w.status = 'waiting' AND s.next_run_at <= now()))
   AND ((w.lock_key NOT IN (SELECT key FROM held)
         AND w.work_query = ANY($2::text[]) AND w.worker = ANY($3::text[]))
        OR h.heartbeat_at < now() - make_interval(secs => coalesce(
               CASE WHEN jsonb_typeof(w.config->'monitor_lag') = 'number' THEN  -- nested: in order
                   CASE WHEN (w.config->'monitor_lag')::numeric BETWEEN 1 AND 86400
                        THEN (w.config->'monitor_lag')::float8 END END, 60)))
 ORDER BY s.next_run_at NULLS FIRST
 LIMIT $1

-- name: terminate_host
-- A frozen or cut-off host: end its backends so its session locks and open transactions go.
-- Needs the same role or pg_signal_backend.
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
  FROM pg_stat_activity
 WHERE application_name = $1 AND pid <> pg_backend_pid()

-- name: end_zombies
-- After a lost session: end this host's old control backend ($1, it may still hold session
-- locks behind a half-open socket) and old iteration backends still inside a transaction ($2),
-- all recorded on server $4 (connect.SERVER_ID): only if this is still that server.
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
  FROM pg_stat_activity
 WHERE application_name = $3 AND pid <> pg_backend_pid()
   AND (pid = ANY($1::int[]) OR (pid = ANY($2::int[]) AND state <> 'idle'))
   AND $4::text = extract(epoch FROM pg_postmaster_start_time())::text

-- name: backend_roles
-- Who we are, and which roles a frozen host's backends run as (for a clear error).
SELECT quote_ident(current_user::text) AS me,
       (SELECT string_agg(DISTINCT quote_ident(usename::text), ', ')
          FROM pg_stat_activity WHERE application_name = $1) AS theirs

-- name: forget_host
DELETE FROM {schema}.hosts WHERE host_id = $1

-- name: unlock_all
-- A leaving host's session locks: every name it owns (sent inlined with forget_host and notify).
SELECT pg_advisory_unlock_all()

-- name: notify
SELECT pg_notify($1, $2)

-- name: fence
-- The full fence: why book_batch found no row (superseded, a stop waiting, new callables, or
-- a due wake-up). Locks this name's state row for the transaction, so a claim or stop (which
-- bump the generation) waits for us, and we see theirs if they came first. The revision is the
-- state row's: if we waited for a ping's lock, only that row is re-read (see protocol.py). The
-- owner ($4) is tested with the generation: a claim lost in a crash (claims commit without
-- waiting for their flush) may see another host's claim reach the same generation.
SELECT w.status, s.revision
  FROM {schema}.worker_state s JOIN {schema}.workers w USING (name)
 WHERE s.name = $1 AND s.generation = $2 AND s.owner_host = $4
   AND pg_try_advisory_xact_lock_shared($3)
   FOR UPDATE OF s

-- name: book_batch
-- First statement of every iteration (sent with BEGIN, parameters inlined): the fence and the
-- bookkeeping of a batch in one write. It matches only while the generation is ours ($2, with
-- our host as its owner, $5: see fence), the callables are the ones we loaded ($3), the worker
-- runs, and no stop waits (the stop lock, $4, try-locked shared); its row lock then holds
-- claims and stops off until we end. When the query finds no work, unbook_batch (or go_idle /
-- go_waiting) puts the counters back. With $6 = 1 (a poll expected to go idle past the
-- cooldown) it also takes the name's wake lock exclusively, as try_go_idle does, so that the
-- work query after it is the go-idle confirmation itself (protocol.py, "No lost wakeup"); no
-- match then may also mean a ping is in flight.
-- Generation and revision are tested on worker_state, the row being updated: when this waits
-- for a ping's or a claim's row lock, PostgreSQL re-checks the new version of that row only
-- (the joined workers row stays as the statement's snapshot saw it), and the work query that
-- follows sees what the lock holder committed.
UPDATE {schema}.worker_state s
   SET batches = s.batches + 1, prev_work_at = s.last_work_at, last_work_at = now(),
       consecutive_failures = 0, next_run_at = now(), cooling = false
  FROM {schema}.workers w
 WHERE w.name = s.name AND s.name = $1 AND s.generation = $2 AND s.revision = $3
   AND s.owner_host = $5 AND w.status = 'running' AND pg_try_advisory_xact_lock_shared($4)
   AND ($6 = 0 OR pg_try_advisory_xact_lock(w.wake_key))

-- name: unbook_batch
-- The query found no work (within the cooldown): the counters go back, and the loop is cooling,
-- so that a ping tells its owner at once (migrations/0006).
UPDATE {schema}.worker_state
   SET batches = batches - 1, last_work_at = prev_work_at, cooling = true
 WHERE name = $1 AND generation = $2

-- name: debounce
UPDATE {schema}.worker_state SET next_run_at = now() + make_interval(secs => $3)
 WHERE name = $1 AND generation = $2

-- name: load_worker
SELECT work_query, worker, config::text AS config, revision FROM {schema}.workers WHERE name = $1

-- name: wake_from_timeout
UPDATE {schema}.workers SET status = 'running', updated_at = now()
 WHERE name = $1 AND status = 'waiting'

-- name: record_failure
-- No row when superseded; stopped: the count reached the config's max_failures (see schema.sql).
SELECT consecutive_failures, stopped FROM {schema}.record_failure($1, $2, $3, $4)

-- name: try_go_idle
-- Exclusive against every in-flight ping of this name; false means a ping is in flight: keep going.
SELECT pg_try_advisory_xact_lock(wake_key) FROM {schema}.workers WHERE name = $1

-- name: go_idle
WITH st AS (
    UPDATE {schema}.worker_state
       SET next_run_at = NULL, owner_host = NULL, batches = batches - 1,
           last_work_at = prev_work_at
     WHERE name = $1 AND generation = $2
    RETURNING name
)
UPDATE {schema}.workers w SET status = 'idle', updated_at = now()
  FROM st WHERE w.name = st.name AND w.status = 'running'

-- name: go_waiting
WITH st AS (
    UPDATE {schema}.worker_state
       SET next_run_at = now() + make_interval(secs => $3), batches = batches - 1,
           last_work_at = prev_work_at
     WHERE name = $1 AND generation = $2
    RETURNING name
)
UPDATE {schema}.workers w SET status = 'waiting', updated_at = now()
  FROM st WHERE w.name = st.name AND w.status = 'running'

-- name: run_in
SELECT w.status, greatest(0, coalesce(extract(epoch FROM s.next_run_at - now()), 0))::float8 AS run_in,
       coalesce(extract(epoch FROM now() - s.last_work_at), 1e9)::float8 AS since_work
  FROM {schema}.worker_state s JOIN {schema}.workers w USING (name)
 WHERE s.name = $1 AND s.generation = $2

-- name: migrations_readable
-- Whether this role can read the migration record (catalog reads only: never raises).
SELECT EXISTS (
    SELECT FROM pg_catalog.pg_tables
     WHERE schemaname = $1 AND tablename = 'schema_migrations'
       AND has_schema_privilege(schemaname, 'USAGE')
       AND has_table_privilege(quote_ident(schemaname) || '.schema_migrations', 'SELECT'))

-- name: applied_migrations
SELECT version FROM {schema}.schema_migrations ORDER BY version

-- The migration runner's statements (batchloop/migrations.py), and `batchloop sql`'s. DDL takes
-- no parameters: these are only sent inlined, in scripts (sql.script).

-- name: migration_lock
-- Serialises concurrent migrators of one schema ($1: a key from its name) until commit.
SELECT pg_advisory_xact_lock($1)

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema}

-- name: create_migration_record
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version integer PRIMARY KEY, name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())

-- name: use_schema
-- Migrations and schema.sql name their objects unqualified.
SET LOCAL search_path TO {schema}

-- name: record_migration
INSERT INTO {schema}.schema_migrations (version, name) VALUES ($1, $2)

-- name: set_schema_version
-- An IMMUTABLE constant, the version of the code that migrated last ($1, inlined).
CREATE OR REPLACE FUNCTION {schema}.schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS 'SELECT $1'

-- name: main_module_workers
-- Running or waiting workers whose callables a `python x.py` script registered (module
-- __main__): a host names them once at start, since the monitor skips names it cannot run.
SELECT name, work_query, worker
  FROM {schema}.workers
 WHERE status IN ('running', 'waiting')
   AND (starts_with(work_query, '__main__:') OR starts_with(worker, '__main__:'))
 ORDER BY name
 LIMIT 100
