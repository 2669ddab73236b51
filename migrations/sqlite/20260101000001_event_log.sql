-- Meridian event log (embedded SQLite). Same shape as the Postgres log.
-- recorded_at / saved_at are RFC 3339 UTC text with microseconds
-- ('2026-01-01T12:00:00.000000Z'), which sorts by time and works with SQLite's
-- date functions.
CREATE TABLE events (
    position       INTEGER PRIMARY KEY CHECK (position > 0),
    stream         TEXT    NOT NULL CHECK (length(stream) BETWEEN 1 AND 256),
    sequence       INTEGER NOT NULL CHECK (sequence > 0),
    recorded_at    TEXT    NOT NULL,
    actor          TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    prev_hash      TEXT    NOT NULL,
    hash           TEXT    NOT NULL,
    CONSTRAINT events_stream_sequence_key UNIQUE (stream, sequence)
);
CREATE INDEX events_actor_idx ON events (actor, position);
CREATE INDEX events_recorded_at_idx ON events (recorded_at, position);

CREATE TABLE log_head (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    position INTEGER NOT NULL,
    hash     TEXT    NOT NULL
);
INSERT INTO log_head (id, position, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE snapshots (
    stream   TEXT    PRIMARY KEY,
    sequence INTEGER NOT NULL,
    state    TEXT    NOT NULL,
    saved_at TEXT    NOT NULL
);
