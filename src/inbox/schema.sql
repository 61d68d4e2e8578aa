-- Factlib inbox schema, version 2: the consuming service's side of exactly-once.
--
-- `factlib inbox setup` installs this file in one transaction when factlib.inbox_version() is
-- missing or older than the version below, and leaves it alone when it is the same or newer.
-- It can also be run by hand: psql -v ON_ERROR_STOP=1 -1 -f schema.sql. A later version that
-- changes a table must ALTER it here, so that an upgrade keeps the rows.
--
--   factlib.inbox               one row per fact, written by `factlib inbox` (fact id = key)
--   factlib.inbox_offsets       the next Kafka offset to read, per group, topic and partition,
--                               written in the same transaction as the facts
--   factlib.inbox_dead_letters  records that are not Factlib envelopes, with the error
--   factlib.inbox_claims        factlib.inbox_claim(consumer, fact_id): once per consumer and fact
--
-- Processing (any language): a worker takes the oldest unprocessed fact of each aggregate,
-- FOR UPDATE SKIP LOCKED, does its own writes and sets processed_at in the same transaction.
-- Only the oldest unprocessed fact of an aggregate is eligible, so concurrent workers keep
-- each aggregate's order (README: "Processing facts from the inbox").

SET LOCAL search_path = pg_catalog, pg_temp;

CREATE SCHEMA IF NOT EXISTS factlib;

-- The installed inbox schema version; `factlib inbox setup` compares it with its own.
-- (A quoted body, not `RETURN 2`: SQL-standard bodies need PostgreSQL 14, and an inbox
-- database may be a PostgreSQL 13.)
CREATE OR REPLACE FUNCTION factlib.inbox_version() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 2 $$;

CREATE TABLE IF NOT EXISTS factlib.inbox (
    id             uuid        PRIMARY KEY,
    -- Arrival order: increasing within a partition, so within an aggregate. Unique as generated
    -- (GENERATED ALWAYS refuses other values); no unique index, which would cost every insert.
    seq            bigint      GENERATED ALWAYS AS IDENTITY,
    topic          text        NOT NULL,
    "partition"    integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        bytea       NOT NULL,
    metadata       jsonb       NOT NULL DEFAULT '{}',
    trace_id       text,
    span_id        text,
    created_at     timestamptz,
    received_at    timestamptz NOT NULL DEFAULT now(),
    processed_at   timestamptz,
    -- Failed processing attempts, the last error, and when to try again (a worker's bookkeeping;
    -- a failing fact holds back the later facts of its aggregate).
    attempts       integer     NOT NULL DEFAULT 0,
    last_error     text,
    retry_at       timestamptz
);
-- Fresh statistics keep the workers' claim on its indexes (without them a bulk-loaded inbox is
-- scanned whole for every claim): analyze after every 1% (+ 1,000 rows) of change.
ALTER TABLE factlib.inbox SET (autovacuum_analyze_scale_factor = 0.01,
                               autovacuum_analyze_threshold = 1000);
COMMENT ON TABLE factlib.inbox IS
    'Facts received from Kafka by `factlib inbox`, once each (id is the fact id); processed_at is set by the service''s worker in the transaction that processes the fact';

-- The workers' queries: unprocessed facts in arrival order, and the oldest per aggregate.
CREATE INDEX IF NOT EXISTS inbox_unprocessed ON factlib.inbox (seq)
    WHERE processed_at IS NULL;
CREATE INDEX IF NOT EXISTS inbox_unprocessed_aggregate
    ON factlib.inbox (aggregate_type, aggregate_id, seq) WHERE processed_at IS NULL;
-- Retention deletes processed rows by age.
CREATE INDEX IF NOT EXISTS inbox_processed_at ON factlib.inbox (processed_at)
    WHERE processed_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS factlib.inbox_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    "partition"    integer     NOT NULL,
    -- The next offset to read: the last one written + 1, as Kafka counts.
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, "partition")
);
COMMENT ON TABLE factlib.inbox_offsets IS
    'The next offset `factlib inbox` reads per group/topic/partition; written in the transaction that writes the facts. Kafka''s committed group offsets are not used';

CREATE TABLE IF NOT EXISTS factlib.inbox_dead_letters (
    topic       text        NOT NULL,
    "partition" integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    error       text        NOT NULL,
    key         bytea,
    value       bytea,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
);
COMMENT ON TABLE factlib.inbox_dead_letters IS
    'Records `factlib inbox` could not take as facts (not a Factlib envelope, a missing field, an id that is not a UUID), with the reason';

CREATE TABLE IF NOT EXISTS factlib.inbox_claims (
    consumer   text        NOT NULL,
    fact_id    uuid        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, fact_id)
);
COMMENT ON TABLE factlib.inbox_claims IS
    'factlib.inbox_claim(consumer, fact_id): one row per consumer and fact it has taken';
CREATE INDEX IF NOT EXISTS inbox_claims_claimed_at ON factlib.inbox_claims (claimed_at);

-- True the first time a consumer claims a fact, false on every later call. It runs in the
-- caller's transaction: the claim counts only if that transaction commits, so a service that
-- consumes Kafka with its own client calls it first and does its writes only when it is true.
-- A concurrent claim of the same fact waits for the first one's transaction to end.
CREATE OR REPLACE FUNCTION factlib.inbox_claim(consumer text, fact_id uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
BEGIN
  IF consumer IS NULL OR fact_id IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'factlib.inbox_claim: consumer and fact_id must not be NULL';
  END IF;
  INSERT INTO factlib.inbox_claims (consumer, fact_id) VALUES ($1, $2)
    ON CONFLICT DO NOTHING;
  RETURN FOUND;
END
$$;
COMMENT ON FUNCTION factlib.inbox_claim(text, uuid) IS
    'True once per (consumer, fact_id), in the caller''s transaction; false on every later call';

-- `factlib inbox`'s offsets, in the transaction of a batch: each partition's next offset moves
-- from `expected_offsets` (what this process read or wrote last; NULL: it found no row) to `next_offsets`. If
-- another process moved it meanwhile (it took the partition in a rebalance this one had not
-- seen), nothing is changed and the transaction fails with SQLSTATE 40001, so the batch rolls
-- back and the inbox reads the offsets again. (Added in v2.)
CREATE OR REPLACE FUNCTION factlib.inbox_advance(consumer_group text, topics text[],
                                                 partitions integer[], expected_offsets bigint[],
                                                 next_offsets bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
  i integer;
  moved integer;
BEGIN
  FOR i IN 1 .. coalesce(array_length(topics, 1), 0) LOOP
    IF expected_offsets[i] IS NULL THEN
      INSERT INTO factlib.inbox_offsets AS o (consumer_group, topic, "partition", next_offset)
        VALUES ($1, topics[i], partitions[i], next_offsets[i])
        ON CONFLICT DO NOTHING;
    ELSE
      UPDATE factlib.inbox_offsets AS o SET next_offset = next_offsets[i], updated_at = now()
        WHERE o.consumer_group = $1 AND o.topic = topics[i] AND o."partition" = partitions[i]
          AND o.next_offset = expected_offsets[i];
    END IF;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> 1 THEN
      RAISE EXCEPTION USING ERRCODE = '40001',
        MESSAGE = format('factlib inbox: the stored offset of %s/%s moved under this process (it expected %s): another process took the partition',
                         topics[i], partitions[i], coalesce(expected_offsets[i]::text, 'no row'));
    END IF;
  END LOOP;
END
$$;
