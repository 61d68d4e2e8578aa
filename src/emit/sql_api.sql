-- Factlib SQL emitter API, version 1: write facts from SQL, in the caller's transaction.
--
--   SELECT factlib.emit('order', 'o-1', 'order.placed', '\x7b7d'::bytea);       -- bytes payload
--   SELECT factlib.emit_json('order', 'o-1', 'order.placed', '{"total": 42}');   -- JSON payload
--   SELECT factlib.emit_traced('order', 'o-1', 'order.placed', '\x'::bytea,
--                              '4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7');
--
-- Each builds the factlib.v1.Fact envelope (proto/factlib/v1/fact.proto; field numbers of the Go
-- Factlib's OutboxEvent) and writes it with pg_logical_emit_message(true, prefix, envelope), so
-- the fact exists if and only if the caller's transaction commits. Each returns the fact's id.
--
-- `factlib setup` installs this file in one transaction (CREATE OR REPLACE throughout) when
-- factlib.api_version() is missing or older than the version below, and leaves it alone when it
-- is the same or newer. It can also be run by hand: psql -v ON_ERROR_STOP=1 -1 -f sql_api.sql.
-- A later version that drops or changes a signature must DROP FUNCTION the old one here.
--
-- Permissions: every function is SECURITY INVOKER. pg_logical_emit_message needs no privilege
-- beyond EXECUTE, which PUBLIC has by default (checked on PostgreSQL 15), so an application role
-- without REPLICATION or superuser can emit once it may use the schema:
--   GRANT USAGE ON SCHEMA factlib TO app;
--
-- Bad arguments raise SQLSTATE 22023 (invalid_parameter_value) with a message that names the
-- argument; nothing is emitted, and the caller's transaction is aborted as for any error.
--
-- Encoding notes (proto3, byte for byte what prost, the Rust encoder, writes for the same fact):
-- fields in number order; payload omitted when empty; map entries sorted by the key's UTF-8
-- bytes, each a nested message (key = 1, value = 2) that omits an empty key or value; text
-- converted to UTF-8 whatever the database encoding.

-- Names in the bodies below resolve now, against pg_catalog only (the SQL-standard bodies are
-- parsed here; the PL/pgSQL ones run with this search_path), never against the caller's path.
SET LOCAL search_path = pg_catalog, pg_temp;

CREATE SCHEMA IF NOT EXISTS factlib;
COMMENT ON SCHEMA factlib IS 'Factlib SQL emitter API (factlib.emit, factlib.emit_json, factlib.emit_traced)';

-- The installed API version; `factlib setup` compares it with its own.
CREATE OR REPLACE FUNCTION factlib.api_version() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 1;

-- Raises: a varint of a negative value would be 10 bytes that nothing here ever needs, and
-- a NULL must never reach pg_logical_emit_message (it is STRICT: it would emit nothing).
CREATE OR REPLACE FUNCTION factlib._varint_negative(v bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'XX000',
    MESSAGE = format('factlib: internal error: varint of %s', coalesce(v::text, 'NULL'));
END
$$;

-- Protobuf varint of a non-negative integer: 7 bits a byte, least significant first, the top
-- bit set on every byte but the last. A plain SQL expression, so that the planner inlines it
-- into the caller (a SQL function call that is not inlined costs a plan per call): one and two
-- bytes (lengths below 16 KiB) directly, longer ones as the first n of nine bytes.
CREATE OR REPLACE FUNCTION factlib._varint(v bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN v >= 0 AND v < 128 THEN set_byte('\x00'::bytea, 0, v::integer)
  WHEN v >= 0 AND v < 16384 THEN
    set_byte(set_byte('\x0000'::bytea, 0, ((v & 127) | 128)::integer), 1, (v >> 7)::integer)
  WHEN v >= 0 THEN substring(
    set_byte(set_byte(set_byte(set_byte(set_byte(set_byte(set_byte(set_byte(set_byte('\x000000000000000000'::bytea,
      0, ((v & 127) | CASE WHEN v >= 128 THEN 128 ELSE 0 END)::integer),
      1, ((v >> 7) & 127 | CASE WHEN v >= 16384 THEN 128 ELSE 0 END)::integer),
      2, ((v >> 14) & 127 | CASE WHEN v >= 2097152 THEN 128 ELSE 0 END)::integer),
      3, ((v >> 21) & 127 | CASE WHEN v >= 268435456 THEN 128 ELSE 0 END)::integer),
      4, ((v >> 28) & 127 | CASE WHEN v >= 34359738368 THEN 128 ELSE 0 END)::integer),
      5, ((v >> 35) & 127 | CASE WHEN v >= 4398046511104 THEN 128 ELSE 0 END)::integer),
      6, ((v >> 42) & 127 | CASE WHEN v >= 562949953421312 THEN 128 ELSE 0 END)::integer),
      7, ((v >> 49) & 127 | CASE WHEN v >= 72057594037927936 THEN 128 ELSE 0 END)::integer),
      8, (v >> 56)::integer)  -- bits 56..62: the last byte of a bigint
    FROM 1 FOR CASE WHEN v < 2097152 THEN 3 WHEN v < 268435456 THEN 4 WHEN v < 34359738368 THEN 5
                        WHEN v < 4398046511104 THEN 6 WHEN v < 562949953421312 THEN 7
                        WHEN v < 72057594037927936 THEN 8 ELSE 9 END)
  ELSE factlib._varint_negative(v)
END;

-- A length-delimited field: its tag byte (field number << 3 | 2), the length, the bytes.
CREATE OR REPLACE FUNCTION factlib._field(tag bytea, val bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN tag || factlib._varint(length(val)) || val;

-- The entries of a map<string, string> field (tag byte `tag`) from a JSON object of string
-- values, in the order of the keys' UTF-8 bytes. `arg` names the argument in errors. A loop of
-- simple expressions: one query whose executor state is built per call is the only per-call
-- set-up cost, so it stays small.
CREATE OR REPLACE FUNCTION factlib._map(tag bytea, m jsonb, arg text) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  out bytea := '\x'::bytea;
  key_text text;
  key_utf8 bytea;
  val jsonb;
  val_utf8 bytea;
  entry bytea;
BEGIN
  IF jsonb_typeof(m) <> 'object' THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = format('factlib: %s must be a JSON object of string values, not a JSON %s',
                       arg, jsonb_typeof(m)),
      HINT = format('pass e.g. ''{"tenant": "acme"}''::jsonb, or ''{}'' for no %s', arg);
  END IF;
  FOR key_text, key_utf8, val IN
    SELECT e.key, convert_to(e.key, 'UTF8') AS k, e.value FROM jsonb_each(m) AS e ORDER BY k
  LOOP
    IF jsonb_typeof(val) <> 'string' THEN
      RAISE EXCEPTION USING ERRCODE = '22023',
        MESSAGE = format('factlib: %s value for key "%s" is a JSON %s, but %s values must be JSON strings',
                         arg, key_text, jsonb_typeof(val), arg),
        HINT = 'convert it to a string first, e.g. to_jsonb(x::text)';
    END IF;
    val_utf8 := convert_to(val #>> '{}', 'UTF8');
    -- MapEntry { key = 1, value = 2 }, each omitted when empty (as prost writes it).
    entry := CASE WHEN length(key_utf8) = 0 THEN '\x'::bytea
                  ELSE factlib._field('\x0a'::bytea, key_utf8) END
          || CASE WHEN length(val_utf8) = 0 THEN '\x'::bytea
                  ELSE factlib._field('\x12'::bytea, val_utf8) END;
    out := out || factlib._field(tag, entry);
  END LOOP;
  RETURN out;
END
$$;

-- The encoder and emitter behind the public functions. Checks every argument before anything
-- is written; `traced` says whether trace_id and span_id are given (then both required).
CREATE OR REPLACE FUNCTION factlib._emit(
  prefix text, aggregate_type text, aggregate_id text, event_type text, payload bytea,
  metadata jsonb, traced boolean, trace_id text, span_id text, trace_metadata jsonb)
RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz;
  ns bigint;
  raw bytea;
  fact_id uuid;
  trace bytea := '\x'::bytea;
  type_utf8 bytea;
  id_utf8 bytea;
  event_utf8 bytea;
  envelope bytea;
  lsn pg_lsn;
BEGIN
  IF aggregate_type IS NULL OR aggregate_type = '' THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'factlib: aggregate_type must be a non-empty string',
      HINT = 'pass the kind of aggregate the fact is about, e.g. ''order''';
  END IF;
  IF aggregate_id IS NULL OR aggregate_id = '' THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'factlib: aggregate_id must be a non-empty string',
      HINT = 'pass the aggregate''s id, e.g. ''o-1''; it becomes the Kafka key';
  END IF;
  IF event_type IS NULL OR event_type = '' THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'factlib: event_type must be a non-empty string',
      HINT = 'pass what happened, e.g. ''order.placed''';
  END IF;
  IF payload IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'factlib: payload must not be NULL',
      HINT = 'pass ''\x''::bytea (factlib.emit) or ''null''::jsonb (factlib.emit_json) for an empty payload';
  END IF;
  IF prefix IS NULL OR prefix = '' THEN
    RAISE EXCEPTION USING ERRCODE = '22023',
      MESSAGE = 'factlib: prefix must be a non-empty string',
      HINT = 'leave it out for the default ''factlib'', or pass the relay''s --prefix';
  END IF;
  IF traced THEN
    -- What the relay needs for a W3C traceparent header (src/sink/record.rs), in the
    -- lowercase form the W3C spec requires.
    IF trace_id IS NULL OR trace_id !~ '^[0-9a-f]{32}$' OR trace_id = repeat('0', 32) THEN
      RAISE EXCEPTION USING ERRCODE = '22023',
        MESSAGE = format('factlib: trace_id must be 32 lowercase hex digits, not all zero (a W3C trace-id); got %s',
                         coalesce('"' || trace_id || '"', 'NULL')),
        HINT = 'use factlib.emit for a fact without trace context';
    END IF;
    IF span_id IS NULL OR span_id !~ '^[0-9a-f]{16}$' OR span_id = repeat('0', 16) THEN
      RAISE EXCEPTION USING ERRCODE = '22023',
        MESSAGE = format('factlib: span_id must be 16 lowercase hex digits, not all zero (a W3C parent-id); got %s',
                         coalesce('"' || span_id || '"', 'NULL')),
        HINT = 'use factlib.emit for a fact without trace context';
    END IF;
    -- TraceInfo { trace_id = 1 (32 bytes), span_id = 2 (16 bytes), metadata = 3 }.
    trace := '\x0a20'::bytea || convert_to(trace_id, 'UTF8')
          || '\x1210'::bytea || convert_to(span_id, 'UTF8')
          || CASE WHEN trace_metadata IS NULL OR trace_metadata = '{}'::jsonb THEN '\x'::bytea
                  ELSE factlib._map('\x1a'::bytea, trace_metadata, 'trace_metadata') END;
    trace := factlib._field('\x42'::bytea, trace);
  END IF;

  -- UUIDv7 (RFC 9562): 48-bit Unix milliseconds, version 7, 74 random bits from
  -- gen_random_uuid(), RFC variant. created_at is the same instant in Unix nanoseconds
  -- (clock_timestamp() has microsecond resolution).
  ts := clock_timestamp();
  ns := (extract(epoch FROM ts) * 1000000)::bigint * 1000;
  raw := overlay(uuid_send(gen_random_uuid())
                 PLACING substring(int8send(ns / 1000000) FROM 3 FOR 6) FROM 1 FOR 6);
  raw := set_byte(raw, 6, (get_byte(raw, 6) & 15) | 112);
  raw := set_byte(raw, 8, (get_byte(raw, 8) & 63) | 128);
  fact_id := encode(raw, 'hex')::uuid;

  -- Every factlib._field argument is a variable: an expression argument would be computed
  -- twice once the call is inlined, or keep the call from being inlined at all.
  type_utf8 := convert_to(aggregate_type, 'UTF8');
  id_utf8 := convert_to(aggregate_id, 'UTF8');
  event_utf8 := convert_to(event_type, 'UTF8');
  envelope := '\x0a24'::bytea || convert_to(fact_id::text, 'UTF8')  -- id = 1 (36 bytes)
           || factlib._field('\x12'::bytea, type_utf8)              -- aggregate_type = 2
           || factlib._field('\x1a'::bytea, id_utf8)                -- aggregate_id = 3
           || factlib._field('\x22'::bytea, event_utf8)             -- event_type = 4
           || CASE WHEN length(payload) = 0 THEN '\x'::bytea                     -- payload = 5
                   ELSE factlib._field('\x2a'::bytea, payload) END
           || '\x30'::bytea || factlib._varint(ns)                                -- created_at = 6
           || CASE WHEN metadata IS NULL OR metadata = '{}'::jsonb THEN '\x'::bytea       -- metadata = 7
                   ELSE factlib._map('\x3a'::bytea, metadata, 'metadata') END
           || trace;                                                              -- trace_info = 8
  IF envelope IS NULL THEN  -- pg_logical_emit_message is STRICT: it would emit nothing
    RAISE EXCEPTION USING ERRCODE = 'XX000', MESSAGE = 'factlib: internal error: NULL envelope';
  END IF;
  lsn := pg_logical_emit_message(true, prefix, envelope);
  RETURN fact_id;
END
$$;

CREATE OR REPLACE FUNCTION factlib.emit(
  aggregate_type text, aggregate_id text, event_type text, payload bytea,
  metadata jsonb DEFAULT '{}', prefix text DEFAULT 'factlib')
RETURNS uuid
LANGUAGE sql VOLATILE
RETURN factlib._emit(prefix, aggregate_type, aggregate_id, event_type, payload, metadata,
                     false, NULL::text, NULL::text, NULL::jsonb);
COMMENT ON FUNCTION factlib.emit(text, text, text, bytea, jsonb, text) IS
  'Emits a fact (factlib.v1.Fact) in the current transaction; returns its id (UUIDv7)';

-- The payload is the jsonb's text form (payload::text), as UTF-8.
CREATE OR REPLACE FUNCTION factlib.emit_json(
  aggregate_type text, aggregate_id text, event_type text, payload jsonb,
  metadata jsonb DEFAULT '{}', prefix text DEFAULT 'factlib')
RETURNS uuid
LANGUAGE sql VOLATILE
RETURN factlib._emit(prefix, aggregate_type, aggregate_id, event_type,
                     convert_to(payload::text, 'UTF8'), metadata,
                     false, NULL::text, NULL::text, NULL::jsonb);
COMMENT ON FUNCTION factlib.emit_json(text, text, text, jsonb, jsonb, text) IS
  'Emits a fact whose payload is the jsonb''s text in UTF-8; returns its id (UUIDv7)';

-- With W3C trace context: the relay sends `traceparent` (flags from trace_metadata's
-- "traceflags", else 01) and `tracestate` (trace_metadata's "tracestate") headers.
CREATE OR REPLACE FUNCTION factlib.emit_traced(
  aggregate_type text, aggregate_id text, event_type text, payload bytea,
  trace_id text, span_id text,
  metadata jsonb DEFAULT '{}', trace_metadata jsonb DEFAULT '{}', prefix text DEFAULT 'factlib')
RETURNS uuid
LANGUAGE sql VOLATILE
RETURN factlib._emit(prefix, aggregate_type, aggregate_id, event_type, payload, metadata,
                     true, trace_id, span_id, trace_metadata);
COMMENT ON FUNCTION factlib.emit_traced(text, text, text, bytea, text, text, jsonb, jsonb, text) IS
  'Emits a fact with W3C trace context (trace_id: 32, span_id: 16 lowercase hex digits); returns its id';
