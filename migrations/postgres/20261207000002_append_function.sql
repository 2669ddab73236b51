-- One round trip per writer-lane batch (issue 19 §3).
--
-- A lane used to commit a batch in seven round trips (pool ping, BEGIN, stream heads,
-- nextval, INSERT events, upsert heads + NOTIFY, COMMIT). `meridian_append` does all of
-- it in one call, run as its own implicit transaction, so the commit (one WAL flush) is
-- part of the same round trip. Taking positions in a separate autocommit statement is
-- not an option: nextval WAL-logs every 32 values, which gives that statement an xid and
-- a WAL flush of its own (two flushes per batch).
--
-- Because positions are taken inside the call, the chain hash is computed here, with
-- exactly the encoding of `meridian_events::chain_hash` (docs/event-log.md):
--   hash = hex(sha256(prev_hash_hex || canonical_bytes))
--   canonical_bytes = str(stream) || u64be(sequence) || u64be(position)
--                  || i64be(recorded_at µs) || str(actor) || u32be(schema_version)
--                  || str(event_type) || str(payload)      str(s) = u32be(len) || utf8
-- `meridian audit verify` recomputes every hash in Rust, so a divergence shows at once.
--
-- Arguments, one element per append (sorted by stream: heads are locked in name order,
-- so lanes of different processes wait for each other instead of deadlocking):
--   streams, expected (-1 = any, otherwise the stream's current version; 0 = no
--   stream), counts (events of the append);
-- one element per event, appends' events concatenated: actors, types, payloads.
-- Returns each append's version before it (the caller decides conflicts from it with
-- the same rule as here) and, for the rows written in order, positions, prev hashes and
-- hashes. `channel`: NULL = no NOTIFY here (the store notifies after the commit, in a
-- transaction of its own: a notifying transaction holds a cluster-wide lock through
-- its commit's WAL flush, which would make all lanes' commits wait for each other);
-- otherwise pg_notify(channel, '<schema> <highest position>') inside the transaction.
-- A duplicate (stream, sequence) from two processes creating the same stream at
-- once raises unique_violation; the caller retries the batch.
CREATE FUNCTION meridian_append(
    streams        TEXT[],
    expected       BIGINT[],
    counts         INTEGER[],
    actors         TEXT[],
    types          TEXT[],
    payloads       TEXT[],
    schema_ver     INTEGER,
    recorded       TIMESTAMPTZ,
    recorded_us    BIGINT,
    channel        TEXT,
    OUT actual     BIGINT[],
    OUT positions  BIGINT[],
    OUT prev_hashes TEXT[],
    OUT hashes     TEXT[]
) LANGUAGE plpgsql AS $$
DECLARE
    n_appends  INTEGER := coalesce(array_length(streams, 1), 0);
    ev         INTEGER := 0;
    n          INTEGER := 0;
    cur        TEXT := NULL;
    cur_bytes  BYTEA;
    cur_seq    BIGINT;
    cur_hash   TEXT;
    cur_pos    BIGINT := 0;
    touched    BOOLEAN := FALSE;
    pos        BIGINT;
    h          TEXT;
    ver_bytes  BYTEA := int4send(schema_ver);
    at_bytes   BYTEA := int8send(recorded_us);
    r_stream   TEXT[] := '{}';
    r_seq      BIGINT[] := '{}';
    r_actor    TEXT[] := '{}';
    r_type     TEXT[] := '{}';
    r_payload  TEXT[] := '{}';
    h_stream   TEXT[] := '{}';
    h_seq      BIGINT[] := '{}';
    h_pos      BIGINT[] := '{}';
    h_hash     TEXT[] := '{}';
    nh         INTEGER := 0;
    a_bytes    BYTEA;
    t_bytes    BYTEA;
    p_bytes    BYTEA;
BEGIN
    actual := '{}';
    positions := '{}';
    prev_hashes := '{}';
    hashes := '{}';
    FOR i IN 1 .. n_appends LOOP
        IF cur IS DISTINCT FROM streams[i] THEN
            IF touched THEN
                nh := nh + 1;
                h_stream[nh] := cur; h_seq[nh] := cur_seq; h_pos[nh] := cur_pos; h_hash[nh] := cur_hash;
            END IF;
            cur := streams[i];
            cur_bytes := convert_to(cur, 'UTF8');
            cur_bytes := int4send(octet_length(cur_bytes)) || cur_bytes;
            touched := FALSE;
            SELECT s.sequence, s.hash INTO cur_seq, cur_hash
                FROM stream_heads s WHERE s.stream = cur FOR UPDATE;
            IF NOT FOUND THEN
                cur_seq := 0;
                cur_hash := repeat('0', 64);
            END IF;
        END IF;
        actual[i] := cur_seq;
        IF expected[i] = -1 OR expected[i] = cur_seq THEN
            FOR k IN 1 .. counts[i] LOOP
                ev := ev + 1;
                n := n + 1;
                cur_seq := cur_seq + 1;
                pos := nextval('events_position_seq');
                a_bytes := convert_to(actors[ev], 'UTF8');
                t_bytes := convert_to(types[ev], 'UTF8');
                p_bytes := convert_to(payloads[ev], 'UTF8');
                h := encode(sha256(
                    convert_to(cur_hash, 'UTF8') || cur_bytes || int8send(cur_seq) || int8send(pos)
                    || at_bytes || int4send(octet_length(a_bytes)) || a_bytes || ver_bytes
                    || int4send(octet_length(t_bytes)) || t_bytes
                    || int4send(octet_length(p_bytes)) || p_bytes), 'hex');
                positions[n] := pos;
                prev_hashes[n] := cur_hash;
                hashes[n] := h;
                r_stream[n] := cur;
                r_seq[n] := cur_seq;
                r_actor[n] := actors[ev];
                r_type[n] := types[ev];
                r_payload[n] := payloads[ev];
                cur_hash := h;
                cur_pos := pos;
                touched := TRUE;
            END LOOP;
        ELSE
            ev := ev + counts[i];
        END IF;
    END LOOP;
    IF touched THEN
        nh := nh + 1;
        h_stream[nh] := cur; h_seq[nh] := cur_seq; h_pos[nh] := cur_pos; h_hash[nh] := cur_hash;
    END IF;
    IF n = 0 THEN
        RETURN;
    END IF;
    INSERT INTO events (position, stream, sequence, recorded_at, actor, schema_version,
                        event_type, payload, prev_hash, hash)
    SELECT u.position, u.stream, u.sequence, recorded, u.actor, schema_ver, u.event_type,
           u.payload, u.prev_hash, u.hash
    FROM unnest(positions, r_stream, r_seq, r_actor, r_type, r_payload, prev_hashes, hashes)
        AS u(position, stream, sequence, actor, event_type, payload, prev_hash, hash);
    INSERT INTO stream_heads (stream, sequence, position, hash)
    SELECT * FROM unnest(h_stream, h_seq, h_pos, h_hash)
    ON CONFLICT (stream) DO UPDATE SET sequence = excluded.sequence,
        position = excluded.position, hash = excluded.hash;
    IF channel IS NOT NULL THEN
        PERFORM pg_notify(channel, current_schema()::text || ' ' || pos::text);
    END IF;
END
$$;
