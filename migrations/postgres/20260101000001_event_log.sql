-- Meridian region event log (Postgres).
-- One row per event; `position` is the region-wide order of the hash chain,
-- `(stream, sequence)` the per-stream order used for optimistic concurrency.
-- `payload` is TEXT (not jsonb) so the bytes the hash covers are kept exactly;
-- query it with `payload::jsonb ->> 'field'`.
CREATE TABLE events (
    position       BIGINT      PRIMARY KEY CHECK (position > 0),
    stream         TEXT        NOT NULL CHECK (length(stream) BETWEEN 1 AND 256),
    sequence       BIGINT      NOT NULL CHECK (sequence > 0),
    recorded_at    TIMESTAMPTZ NOT NULL,
    actor          TEXT        NOT NULL,
    schema_version INTEGER     NOT NULL,
    event_type     TEXT        NOT NULL,
    payload        TEXT        NOT NULL,
    prev_hash      TEXT        NOT NULL,
    hash           TEXT        NOT NULL,
    CONSTRAINT events_stream_sequence_key UNIQUE (stream, sequence)
);
CREATE INDEX events_actor_idx ON events (actor, position);
CREATE INDEX events_recorded_at_idx ON events (recorded_at, position);

-- The head of the chain: one row, locked (SELECT ... FOR UPDATE) by every append so
-- positions and prev_hash are assigned atomically and without gaps.
CREATE TABLE log_head (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    position BIGINT   NOT NULL,
    hash     TEXT     NOT NULL
);
INSERT INTO log_head (id, position, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Derived room state at a sequence; not part of the chain (it can always be rebuilt).
CREATE TABLE snapshots (
    stream   TEXT        PRIMARY KEY,
    sequence BIGINT      NOT NULL,
    state    TEXT        NOT NULL,
    saved_at TIMESTAMPTZ NOT NULL
);
