// Command inbox-worker processes facts from factlib.inbox, with pgx v5.
//
// `factlib inbox` writes the facts it reads from Kafka into factlib.inbox in
// the service's PostgreSQL. This worker processes them: it claims the oldest
// fact that may be processed now, runs handle (the service's business logic)
// and marks the fact processed, all in one transaction.
//
//	BEGIN
//	  claimSQL (oldest eligible fact, FOR UPDATE SKIP LOCKED) -> fact, or none: COMMIT, wait
//	  SAVEPOINT; handle(ctx, tx, fact)       the service's writes
//	    ok:    RELEASE; doneSQL              processed_at = clock_timestamp()
//	    error: ROLLBACK TO SAVEPOINT; failedSQL (attempts + 1, last_error, retry_at)
//	COMMIT
//	idle: LISTEN factlib_inbox (every inbox batch notifies), at most -idle-wait seconds
//
// Invariants:
//   - A fact's effects happen once: the handler's writes and processed_at
//     commit together, and a claimed fact stays locked against other workers
//     until that transaction ends (also while its failure is recorded).
//   - Per aggregate, facts are processed in inbox order (seq): only the oldest
//     unprocessed fact of an aggregate is eligible. A failing fact holds its
//     aggregate back until it succeeds; other aggregates go on.
//
// Run as many as you like:
//
//	FACTLIB_INBOX_DATABASE_URL=postgresql://... go run .
//
// SIGTERM or SIGINT: the fact being processed is finished, then it exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// claimSQL is factlib::inbox::CLAIM_SQL, verbatim: the oldest unprocessed
// fact (by seq) that is due and whose aggregate has no older unprocessed
// fact, skipping facts other workers hold.
const claimSQL = `SELECT i.id, i.seq, i.topic, i.partition, i.offset, i.aggregate_type, i.aggregate_id,
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
FOR UPDATE OF i SKIP LOCKED`

const doneSQL = `UPDATE factlib.inbox SET processed_at = clock_timestamp() WHERE id = $1`

const failedSQL = `UPDATE factlib.inbox
SET attempts = attempts + 1, last_error = $2,
    retry_at = now() + $3::double precision * interval '1 second'
WHERE id = $1 AND processed_at IS NULL`

const unprocessedSQL = `SELECT EXISTS (SELECT 1 FROM factlib.inbox WHERE processed_at IS NULL)`

// createSQL is the example's own table; a real service has its own tables instead.
const createSQL = `CREATE TABLE IF NOT EXISTS example_processed (
    fact_id      uuid PRIMARY KEY,
    aggregate_id text NOT NULL,
    seq          bigint NOT NULL,
    n            bigserial
)`

// Fact is a row of factlib.inbox, as claimSQL returns it.
type Fact struct {
	ID            string     `db:"id"`
	Seq           int64      `db:"seq"`
	Topic         string     `db:"topic"`
	Partition     int32      `db:"partition"`
	Offset        int64      `db:"offset"`
	AggregateType string     `db:"aggregate_type"`
	AggregateID   string     `db:"aggregate_id"`
	EventType     string     `db:"event_type"`
	Payload       []byte     `db:"payload"`
	Metadata      string     `db:"metadata"` // a JSON object of strings
	TraceID       *string    `db:"trace_id"`
	SpanID        *string    `db:"span_id"`
	CreatedAt     *time.Time `db:"created_at"`
	ReceivedAt    time.Time  `db:"received_at"`
	Attempts      int32      `db:"attempts"` // failed attempts before this one
}

// handle is the service's processing of one fact: replace it.
//
// It runs inside the transaction that marks the fact processed: write through
// tx and the writes commit exactly when the fact is marked. Return an error to
// fail the fact: its writes are rolled back and it is tried again after
// -retry-after seconds. Don't commit or roll back tx here.
func handle(ctx context.Context, tx pgx.Tx, fact *Fact) error {
	_, err := tx.Exec(ctx,
		`INSERT INTO example_processed (fact_id, aggregate_id, seq) VALUES ($1, $2, $3)`,
		fact.ID, fact.AggregateID, fact.Seq)
	return err
}

type outcome int

const (
	none outcome = iota
	done
	failed
)

// processOne processes the next eligible fact: done, failed, or none when
// nothing is eligible now. An error means the database failed.
func processOne(ctx context.Context, conn *pgx.Conn, retryAfter float64) (outcome, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return none, err
	}
	defer tx.Rollback(ctx) // a no-op once committed

	rows, _ := tx.Query(ctx, claimSQL)
	fact, err := pgx.CollectOneRow(rows, pgx.RowToAddrOfStructByName[Fact])
	if errors.Is(err, pgx.ErrNoRows) {
		return none, tx.Commit(ctx)
	}
	if err != nil {
		return none, fmt.Errorf("claiming a fact: %w", err)
	}

	// A savepoint: an error undoes the handler's writes only, and the fact
	// stays locked while its failure is recorded.
	sp, err := tx.Begin(ctx)
	if err != nil {
		return none, err
	}
	if herr := handle(ctx, sp, fact); herr != nil {
		if conn.IsClosed() {
			return none, herr // the connection is gone: reconnect; the fact is tried again
		}
		if err := sp.Rollback(ctx); err != nil {
			return none, err
		}
		slog.Warn("processing a fact failed; it is tried again later",
			"fact", fact.ID, "retry_after_secs", retryAfter, "error", herr)
		if _, err := tx.Exec(ctx, failedSQL, fact.ID, herr.Error(), retryAfter); err != nil {
			return none, err
		}
		return failed, tx.Commit(ctx)
	}
	if err := sp.Commit(ctx); err != nil {
		return none, err
	}
	if _, err := tx.Exec(ctx, doneSQL, fact.ID); err != nil {
		return none, err
	}
	return done, tx.Commit(ctx)
}

// waitForFacts waits until the inbox notifies, wait passes, or stop is done.
// Notifications that came during processing are delivered first.
func waitForFacts(stop context.Context, conn *pgx.Conn, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(stop, wait)
	defer cancel()
	_, err := conn.WaitForNotification(ctx)
	if err != nil && ctx.Err() != nil {
		return nil // waited long enough, or stopping
	}
	return err
}

type options struct {
	exitWhenIdle bool
	idleWait     time.Duration
	retryAfter   float64
}

// run processes facts on one connection until stop is done (or the inbox is
// idle, with -exit-when-idle). It returns how many facts it processed.
func run(stop context.Context, url string, opt options) (int, error) {
	// Work is done under its own context: a fact begun is finished even when
	// a stop is asked for; stop is looked at between facts.
	ctx := context.Background()
	count := 0
	connectCtx, cancel := context.WithTimeout(stop, 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(connectCtx, url)
	if err != nil {
		return count, err
	}
	defer conn.Close(ctx)

	// Workers starting together must not race on CREATE TABLE.
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('example_processed'))`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, createSQL)
		return err
	})
	if err != nil {
		return count, err
	}
	if _, err := conn.Exec(ctx, "LISTEN factlib_inbox"); err != nil {
		return count, err
	}
	slog.Info("processing facts from factlib.inbox")

	for stop.Err() == nil {
		out, err := processOne(ctx, conn, opt.retryAfter)
		if err != nil {
			return count, err
		}
		switch out {
		case done:
			count++
			continue
		case failed:
			continue
		}
		if opt.exitWhenIdle {
			var unprocessed bool
			if err := conn.QueryRow(ctx, unprocessedSQL).Scan(&unprocessed); err != nil {
				return count, err
			}
			if !unprocessed {
				slog.Info("the inbox has no unprocessed fact; exiting")
				return count, nil
			}
		}
		if err := waitForFacts(stop, conn, opt.idleWait); err != nil {
			return count, err
		}
	}
	return count, nil
}

func main() {
	var opt options
	var idleWait float64
	flag.BoolVar(&opt.exitWhenIdle, "exit-when-idle", false, "exit once factlib.inbox has no unprocessed fact")
	flag.Float64Var(&idleWait, "idle-wait", 1, "`seconds`: with nothing to process, look again after this long (a NOTIFY wakes it sooner)")
	flag.Float64Var(&opt.retryAfter, "retry-after", 5, "`seconds`: a fact whose handler failed is tried again after this long")
	flag.Parse()
	opt.idleWait = time.Duration(idleWait * float64(time.Second))

	url := os.Getenv("FACTLIB_INBOX_DATABASE_URL")
	if url == "" {
		slog.Error("FACTLIB_INBOX_DATABASE_URL is not set: set it to the inbox database's URL")
		os.Exit(2)
	}

	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer cancel()

	total := 0
	backoff := time.Second
	for stop.Err() == nil {
		started := time.Now()
		n, err := run(stop, url, opt)
		total += n
		if err == nil {
			break // stopped, or idle with -exit-when-idle
		}
		if stop.Err() != nil {
			break
		}
		var pgErr interface{ SQLState() string }
		if errors.As(err, &pgErr) && !isConnectionState(pgErr.SQLState()) {
			// Not the connection: a missing inbox schema, a permission, a bug.
			slog.Error("inbox database", "error", err)
			os.Exit(1)
		}
		if time.Since(started) > time.Minute {
			backoff = time.Second
		}
		slog.Warn("inbox database; reconnecting", "error", err, "in", backoff)
		select {
		case <-stop.Done():
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
	slog.Info("stopped", "processed", total)
}

// isConnectionState tells the SQLSTATEs after which connecting again may help:
// class 08 (connection exception), 57P01-57P03 (the server is shutting down or
// starting), 53300 (too many connections).
func isConnectionState(state string) bool {
	switch {
	case len(state) == 5 && state[:2] == "08":
		return true
	case state == "57P01", state == "57P02", state == "57P03", state == "53300":
		return true
	}
	return false
}
