-- Server-side fact generator for perf/drain: builds valid factlib.v1.Fact
-- envelopes in SQL and emits them with pg_logical_emit_message, committing
-- every `per_txn` facts. Much faster than a client round trip per fact, so
-- the backlog for a 1,000,000-fact drain is ready in seconds.
CREATE SCHEMA IF NOT EXISTS factlib_perf;

-- Protobuf varint of a non-negative integer.
CREATE OR REPLACE FUNCTION factlib_perf.varint(v bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE out bytea := '\x'::bytea;
BEGIN
  LOOP
    IF v < 128 THEN
      RETURN out || set_byte('\x00'::bytea, 0, v::int);
    END IF;
    out := out || set_byte('\x00'::bytea, 0, ((v & 127) | 128)::int);
    v := v >> 7;
  END LOOP;
END $$;

-- A length-delimited protobuf field.
CREATE OR REPLACE FUNCTION factlib_perf.field(tag int, val bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
  SELECT set_byte('\x00'::bytea, 0, tag) || factlib_perf.varint(length(val)) || val
$$;

-- A UUIDv7 (RFC 9562), as Factlib's emitters write: 48-bit Unix milliseconds, version 7,
-- random bits from gen_random_uuid(). Time-ordered ids matter to a consumer that indexes them
-- (factlib.inbox's primary key); the relay does not care.
CREATE OR REPLACE FUNCTION factlib_perf.uuid_v7() RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE raw bytea;
BEGIN
  raw := overlay(uuid_send(gen_random_uuid())
                 PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3 FOR 6)
                 FROM 1 FOR 6);
  raw := set_byte(raw, 6, (get_byte(raw, 6) & 15) | 112);
  raw := set_byte(raw, 8, (get_byte(raw, 8) & 63) | 128);
  RETURN encode(raw, 'hex')::uuid;
END $$;

-- Fact i: id (UUIDv7), aggregate_type, aggregate_id (1,000 keys),
-- event_type, payload, created_at (now, Unix ns).
CREATE OR REPLACE FUNCTION factlib_perf.envelope(i bigint, payload bytea) RETURNS bytea
LANGUAGE sql VOLATILE AS $$
  SELECT factlib_perf.field(10, convert_to(factlib_perf.uuid_v7()::text, 'UTF8'))
      || factlib_perf.field(18, '\x6f72646572'::bytea)                      -- "order"
      || factlib_perf.field(26, convert_to('order-' || (i % 1000), 'UTF8'))
      || factlib_perf.field(34, '\x6f726465722e706c61636564'::bytea)        -- "order.placed"
      || factlib_perf.field(42, payload)
      || '\x30'::bytea || factlib_perf.varint((extract(epoch FROM clock_timestamp()) * 1e9)::bigint)
$$;

CREATE OR REPLACE PROCEDURE factlib_perf.emit(prefix text, n bigint, per_txn int, payload_len int)
LANGUAGE plpgsql AS $$
DECLARE
  i bigint := 0;
  p bytea := convert_to(repeat('x', payload_len), 'UTF8');
BEGIN
  WHILE i < n LOOP
    PERFORM pg_logical_emit_message(true, prefix, factlib_perf.envelope(g, p))
      FROM generate_series(i, least(i + per_txn, n) - 1) AS g;
    COMMIT;
    i := i + per_txn;
  END LOOP;
END $$;
