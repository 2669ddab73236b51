-- Per-stream hash chains, parallel writer lanes and signed checkpoints (issue 19 §3),
-- append-only enforcement (issue 17 item 10).
--
-- Until this migration every row chained to the row before it in region position
-- order, under one locked head row (`log_head`): one writer for the whole region. From
-- here on a row chains to the previous row *of its stream*, each stream's last row is
-- remembered in `stream_heads`, and positions come from a sequence, so appends to
-- different rooms commit in parallel. Rows written before stay as they are (their
-- hashes cover them as written): `legacy_chain` keeps where the old global chain ended,
-- and `verify` checks positions 1..=legacy_chain.position the old way.

-- The last row of each stream, updated in the transaction that appends to it.
CREATE TABLE stream_heads (
    stream   TEXT   PRIMARY KEY CHECK (length(stream) BETWEEN 1 AND 256),
    sequence BIGINT NOT NULL CHECK (sequence > 0),
    position BIGINT NOT NULL,
    hash     TEXT   NOT NULL
);
INSERT INTO stream_heads (stream, sequence, position, hash)
SELECT DISTINCT ON (stream) stream, sequence, position, hash
FROM events ORDER BY stream, sequence DESC;

-- The end of the global chain of rows written before this migration (0 = none).
CREATE TABLE legacy_chain (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    position BIGINT   NOT NULL,
    hash     TEXT     NOT NULL
);
INSERT INTO legacy_chain (id, position, hash) SELECT 1, position, hash FROM log_head;

-- Region positions: unique and increasing within a stream; gaps are possible (a
-- rolled-back transaction) and lanes may commit positions out of order.
CREATE SEQUENCE events_position_seq AS BIGINT MINVALUE 1;
SELECT setval('events_position_seq',
              GREATEST((SELECT position FROM log_head), 1),
              (SELECT position FROM log_head) > 0);
DROP TABLE log_head;

-- Signed checkpoints over all stream heads (Ed25519, key outside the database).
-- `body` is the signed JSON exactly as signed.
CREATE TABLE log_checkpoints (
    number     BIGINT      PRIMARY KEY CHECK (number > 0),
    created_at TIMESTAMPTZ NOT NULL,
    body       TEXT        NOT NULL,
    public_key TEXT        NOT NULL,
    signature  TEXT        NOT NULL
);

-- Append-only: rows of the log and its checkpoints are never updated or deleted. A
-- table owner can still disable the trigger; that is what the hash chains and the
-- signed checkpoints are for.
CREATE FUNCTION meridian_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'meridian: % on % refused: the event log is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION meridian_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION meridian_append_only();
CREATE TRIGGER log_checkpoints_append_only BEFORE UPDATE OR DELETE ON log_checkpoints
    FOR EACH ROW EXECUTE FUNCTION meridian_append_only();
