-- Region membership: one row per live media node, renewed every lease period.
-- A lease is not an event: renewals several times a second would drown the audit log.
-- Acquiring a lease and declaring one expired are recorded as events on `node:<id>`.
-- Times are microseconds since the Unix epoch on the writing node's clock.
CREATE TABLE node_leases (
    node          TEXT    PRIMARY KEY CHECK (length(node) BETWEEN 1 AND 256),
    region        TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    incarnation   TEXT    NOT NULL,
    expires_at_us BIGINT  NOT NULL,
    draining      BOOLEAN NOT NULL DEFAULT false
);

-- Finds each room's latest placement without scanning the whole log.
CREATE INDEX events_type_stream_idx ON events (event_type, stream, sequence);
