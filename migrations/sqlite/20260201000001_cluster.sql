-- Region membership: one row per live media node (see the Postgres migration).
CREATE TABLE node_leases (
    node          TEXT    PRIMARY KEY CHECK (length(node) BETWEEN 1 AND 256),
    region        TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    incarnation   TEXT    NOT NULL,
    expires_at_us INTEGER NOT NULL,
    draining      INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX events_type_stream_idx ON events (event_type, stream, sequence);
