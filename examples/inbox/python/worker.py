#!/usr/bin/env python3
"""A worker that processes facts from factlib.inbox, with psycopg 3.

`factlib inbox` writes the facts it reads from Kafka into factlib.inbox in the
service's PostgreSQL. This worker processes them: it claims the oldest fact
that may be processed now, runs `handle` (the service's business logic) and
marks the fact processed, all in one transaction.

    BEGIN
      CLAIM_SQL (oldest eligible fact, FOR UPDATE SKIP LOCKED) -> fact, or none: COMMIT, wait
      SAVEPOINT; handle(conn, fact)          the service's writes
        ok:    RELEASE; DONE_SQL             processed_at = clock_timestamp()
        error: ROLLBACK TO SAVEPOINT; FAILED_SQL (attempts + 1, last_error, retry_at)
    COMMIT
    idle: LISTEN factlib_inbox (every inbox batch notifies), at most --idle-wait seconds

Invariants:
- A fact's effects happen once: the handler's writes and processed_at commit
  together, and a claimed fact stays locked against other workers until that
  transaction ends (also while its failure is recorded).
- Per aggregate, facts are processed in inbox order (seq): only the oldest
  unprocessed fact of an aggregate is eligible. A failing fact holds its
  aggregate back until it succeeds; other aggregates go on.

Run as many as you like:
    FACTLIB_INBOX_DATABASE_URL=postgresql://... python3 worker.py
SIGTERM or SIGINT: the fact being processed is finished, then it exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import signal
import sys
import threading
import time
import uuid

import psycopg
from psycopg.rows import class_row

log = logging.getLogger("inbox-worker")

# factlib::inbox::CLAIM_SQL, verbatim: the oldest unprocessed fact (by seq)
# that is due and whose aggregate has no older unprocessed fact, skipping
# facts other workers hold.
CLAIM_SQL = """\
SELECT i.id, i.seq, i.topic, i.partition, i.offset, i.aggregate_type, i.aggregate_id,
       i.event_type, i.payload, i.metadata::text, i.trace_id, i.span_id, i.created_at,
       i.received_at, i.attempts
FROM factlib.inbox i
WHERE i.processed_at IS NULL
  AND (i.retry_at IS NULL OR i.retry_at <= now())
  AND NOT EXISTS (
        SELECT 1 FROM factlib.inbox e
        WHERE e.processed_at IS NULL
          AND e.aggregate_type = i.aggregate_type
          AND e.aggregate_id = i.aggregate_id
          AND e.seq < i.seq)
ORDER BY i.seq
LIMIT 1
FOR UPDATE OF i SKIP LOCKED"""

DONE_SQL = "UPDATE factlib.inbox SET processed_at = clock_timestamp() WHERE id = %s"

FAILED_SQL = """\
UPDATE factlib.inbox
SET attempts = attempts + 1, last_error = %s,
    retry_at = now() + %s::double precision * interval '1 second'
WHERE id = %s AND processed_at IS NULL"""

UNPROCESSED_SQL = "SELECT EXISTS (SELECT 1 FROM factlib.inbox WHERE processed_at IS NULL)"

# The example's own table; a real service has its own tables instead.
CREATE_SQL = """\
CREATE TABLE IF NOT EXISTS example_processed (
    fact_id      uuid PRIMARY KEY,
    aggregate_id text NOT NULL,
    seq          bigint NOT NULL,
    n            bigserial
)"""


@dataclasses.dataclass(frozen=True)
class Fact:
    """A row of factlib.inbox, as CLAIM_SQL returns it."""

    id: uuid.UUID
    seq: int
    topic: str
    partition: int
    offset: int
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: bytes
    metadata: str  # a JSON object of strings: json.loads(fact.metadata)
    trace_id: str | None
    span_id: str | None
    created_at: datetime.datetime | None
    received_at: datetime.datetime
    attempts: int  # failed attempts before this one


def handle(conn: psycopg.Connection, fact: Fact) -> None:
    """The service's processing of one fact: replace this.

    It runs inside the transaction that marks the fact processed: write
    through `conn` and the writes commit exactly when the fact is marked.
    Raise to fail the fact: its writes are rolled back and it is tried again
    after --retry-after seconds. Don't commit or roll back here.
    """
    conn.execute(
        "INSERT INTO example_processed (fact_id, aggregate_id, seq) VALUES (%s, %s, %s)",
        (fact.id, fact.aggregate_id, fact.seq),
    )


def process_one(conn: psycopg.Connection, retry_after: float) -> str:
    """Processes the next eligible fact: "done", "failed", or "none" when
    nothing is eligible now."""
    with conn.transaction():
        with conn.cursor(row_factory=class_row(Fact)) as cur:
            fact = cur.execute(CLAIM_SQL).fetchone()
        if fact is None:
            return "none"
        try:
            # A savepoint: an error undoes the handler's writes only, and the
            # fact stays locked while its failure is recorded.
            with conn.transaction():
                handle(conn, fact)
        except Exception as err:
            if conn.broken:
                raise  # the connection is gone: reconnect; the fact is tried again
            log.warning(
                "processing a fact failed; it is tried again in %ss: fact=%s error=%r",
                retry_after,
                fact.id,
                str(err),
            )
            conn.execute(FAILED_SQL, (str(err), retry_after, fact.id))
            return "failed"
        conn.execute(DONE_SQL, (fact.id,))
        return "done"


def wait_for_facts(conn: psycopg.Connection, seconds: float, stop: threading.Event) -> None:
    """Waits until the inbox notifies, `seconds` pass, or a stop is asked for."""
    deadline = time.monotonic() + seconds
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        woken = False
        # Short slices, so that a SIGTERM is acted on within half a second.
        # Notifications that came during processing are delivered first.
        for _ in conn.notifies(timeout=min(left, 0.5), stop_after=1):
            woken = True
        if woken:
            return


def run(url: str, args: argparse.Namespace, stop: threading.Event) -> int:
    """Processes facts on one connection until stopped (or idle, with
    --exit-when-idle). Returns how many facts it processed."""
    done = 0
    with psycopg.connect(url, autocommit=True, application_name="inbox-worker") as conn:
        with conn.transaction():
            # Workers starting together must not race on CREATE TABLE.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('example_processed'))")
            conn.execute(CREATE_SQL)
        conn.execute("LISTEN factlib_inbox")
        log.info("processing facts from factlib.inbox")
        while not stop.is_set():
            outcome = process_one(conn, args.retry_after)
            if outcome == "done":
                done += 1
                continue
            if outcome == "failed":
                continue
            if args.exit_when_idle and not conn.execute(UNPROCESSED_SQL).fetchone()[0]:
                log.info("the inbox has no unprocessed fact; exiting")
                stop.set()
                break
            wait_for_facts(conn, args.idle_wait, stop)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description="Process facts from factlib.inbox.")
    parser.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="exit once factlib.inbox has no unprocessed fact",
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="with nothing to process, look again after this long (a NOTIFY wakes it sooner)",
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="a fact whose handler failed is tried again after this long",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = os.environ.get("FACTLIB_INBOX_DATABASE_URL")
    if not url:
        log.error("FACTLIB_INBOX_DATABASE_URL is not set: set it to the inbox database's URL")
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    done = 0
    backoff = 1.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            done += run(url, args, stop)
        except psycopg.OperationalError as err:
            # The database went away (or refused us): connect again.
            if time.monotonic() - started > 60:
                backoff = 1.0
            log.warning("inbox database: %s; reconnecting in %.0fs", str(err).strip(), backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)
    log.info("stopped after processing %d facts", done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
