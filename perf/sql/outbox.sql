-- Server-side outbox-row generator for perf/drain-table: inserts rows into a
-- Debezium-layout outbox table, committing every `per_txn` rows, so that a
-- 1,000,000-row backlog is ready in seconds. The rows match what
-- perf/sql/emit.sql emits as messages: aggregate type "order", 1,000 keys,
-- event type "order.placed", and a jsonb payload of about `payload_len`
-- bytes of text.
CREATE SCHEMA IF NOT EXISTS factlib_perf;

CREATE OR REPLACE PROCEDURE factlib_perf.insert_rows(tbl regclass, n bigint, per_txn int, payload_len int)
LANGUAGE plpgsql AS $$
DECLARE
  i bigint := 0;
  p jsonb := jsonb_build_object('x', repeat('x', greatest(payload_len - 9, 0)));
BEGIN
  WHILE i < n LOOP
    EXECUTE format(
      'INSERT INTO %s (id, aggregatetype, aggregateid, type, payload)
       SELECT gen_random_uuid(), ''order'', ''order-'' || (g %% 1000), ''order.placed'', $1
         FROM generate_series($2, $3) AS g', tbl)
      USING p, i, least(i + per_txn, n) - 1;
    COMMIT;
    i := i + per_txn;
  END LOOP;
END $$;
