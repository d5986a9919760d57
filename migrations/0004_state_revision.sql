-- batchloop schema, version 4: the revision mirrored on the hot row.
-- An iteration's book_batch tests the revision it loaded. When it has to wait for the
-- worker_state row lock of a ping that changes the callables, PostgreSQL re-checks the waiting
-- UPDATE against the row's new version (EvalPlanQual), but only the target row is re-read: a
-- joined workers row is the old snapshot's, so the old revision still matched, and the batch's
-- work query (a later statement, a later snapshot) saw the ping's rows and ran them with the old
-- callables. A revision on worker_state itself is re-read by that re-check.

ALTER TABLE worker_state ADD COLUMN revision bigint NOT NULL DEFAULT 1;  -- = workers.revision

UPDATE worker_state s SET revision = w.revision
  FROM workers w
 WHERE w.name = s.name AND s.revision <> w.revision;

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
