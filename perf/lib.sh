# Shared by the perf/ scripts (sourced, not run).
# perf_setup: starts the environment, builds the release binary (or uses $FACTLIB_BIN),
#   installs /usr/bin/time. PERF_NO_ENV_UP=1: the environment is up and its env.sh sourced
#   already (e.g. from another checkout), so it is not started.
# perf_backlog N PAYLOAD TXN: a fresh slot+publication+prefix ($run), N facts emitted with no
#   relay running; sets $start $end (LSNs) and $wal (bytes). Drops the slots on exit.
perf_setup() {
    if [ -z "${PERF_NO_ENV_UP:-}" ]; then
        tests/env/up >/dev/null
        # shellcheck disable=SC1091
        . target/env/env.sh
    fi
    if [ ! -x /usr/bin/time ]; then
        apt-get install -y -q time >/dev/null 2>&1 || { echo "needs /usr/bin/time: apt-get install time" >&2; exit 1; }
    fi
    if [ -n "${FACTLIB_BIN:-}" ]; then
        F="$FACTLIB_BIN"    # compare builds: FACTLIB_BIN=/path/to/factlib perf/drain ...
    else
        cargo build --release --quiet
        F="${CARGO_TARGET_DIR:-$ROOT/target}/release/factlib"
    fi
    PSQL=(psql -X -q -v ON_ERROR_STOP=1 "$FACTLIB_DATABASE_URL")
}

perf_cleanup() {
    "${PSQL[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE '${run}%' AND NOT active" \
        -c "DROP PUBLICATION IF EXISTS \"$run\"" >/dev/null 2>&1 || true
}

perf_backlog() {
    local n="$1" payload="$2" txn="$3" t0 t1
    run="${PERF_NAME:-perf}_$(date +%s)"
    export FACTLIB_SLOT="$run" FACTLIB_PUBLICATION="$run" FACTLIB_PREFIX="$run"
    out="$ROOT/target/perf/$run"; mkdir -p "$out"
    trap perf_cleanup EXIT
    "$F" setup >/dev/null
    "${PSQL[@]}" -f perf/sql/emit.sql >/dev/null
    echo "== emitting $n facts ($payload-byte payloads, $txn per transaction), no relay running"
    t0=$(date +%s.%N)
    "${PSQL[@]}" -c "CALL factlib_perf.emit('$run', $n, $txn, $payload)"
    t1=$(date +%s.%N)
    end=$("${PSQL[@]}" -At -c "SELECT pg_current_wal_insert_lsn()")
    start=$("${PSQL[@]}" -At -c "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '$run'")
    wal=$("${PSQL[@]}" -At -c "SELECT pg_wal_lsn_diff('$end', '$start')::bigint")
    awk -v a="$t0" -v b="$t1" -v s="$start" -v e="$end" -v w="$wal" \
        'BEGIN { printf "emitted in %.1f s; backlog %s .. %s (%d bytes of WAL)\n", b - a, s, e, w }'
}
