-- Per-stream hash chains and signed checkpoints (see the Postgres migration of the
-- same name). SQLite has one writer, so positions stay contiguous here; the chain
-- and the heads are the same as on Postgres.
CREATE TABLE stream_heads (
    stream   TEXT    PRIMARY KEY CHECK (length(stream) BETWEEN 1 AND 256),
    sequence INTEGER NOT NULL CHECK (sequence > 0),
    position INTEGER NOT NULL,
    hash     TEXT    NOT NULL
);
INSERT INTO stream_heads (stream, sequence, position, hash)
SELECT e.stream, e.sequence, e.position, e.hash FROM events e
WHERE e.sequence = (SELECT max(x.sequence) FROM events x WHERE x.stream = e.stream);

CREATE TABLE legacy_chain (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL,
    hash     TEXT    NOT NULL
);
INSERT INTO legacy_chain (id, position, hash) SELECT 1, position, hash FROM log_head;
DROP TABLE log_head;

CREATE TABLE log_checkpoints (
    number     INTEGER PRIMARY KEY CHECK (number > 0),
    created_at TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    public_key TEXT    NOT NULL,
    signature  TEXT    NOT NULL
);

-- Append-only (tests that tamper drop these triggers first).
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'meridian: UPDATE on events refused: the event log is append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'meridian: DELETE on events refused: the event log is append-only'); END;
CREATE TRIGGER log_checkpoints_no_update BEFORE UPDATE ON log_checkpoints
BEGIN SELECT RAISE(ABORT, 'meridian: UPDATE on log_checkpoints refused: append-only'); END;
CREATE TRIGGER log_checkpoints_no_delete BEFORE DELETE ON log_checkpoints
BEGIN SELECT RAISE(ABORT, 'meridian: DELETE on log_checkpoints refused: append-only'); END;
