# bench/lib.sh — helpers shared by bench/run.sh and bench/compare.sh (sourced, not run).
#
# The sourcing script sets, before calling anything here:
#   repo  the repository root        work  its scratch directory
#   DB    the database it owns       RUN_TIMEOUT  seconds a measured command may take
#
# It sets, for the sourcing script: PGBIN PGHOST PGPORT PGUSER TANSU SSLMODE CONNINFO TIME_BIN
# (bench_env), KAFKA (broker_start), T_WALL T_CPU T_RSS (timed).
# shellcheck shell=bash disable=SC2034,SC2154

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }

# The test environment (PostgreSQL cluster, tansu) from scripts/test-env.sh unless its settings
# are already in the environment, GNU time (installed from Debian if missing), and the
# connection settings every tool of the run uses.
bench_env() {
    if [ -z "${PGCDC_TEST_PGBIN:-}" ]; then
        log "preparing the test environment (scripts/test-env.sh)"
        bash "$repo/scripts/test-env.sh" >"$work/env.sh"
        # shellcheck disable=SC1091
        source "$work/env.sh"
    fi
    PGBIN=$PGCDC_TEST_PGBIN
    PGHOST=${PGCDC_TEST_PGHOST:-127.0.0.1}
    PGPORT=${PGCDC_TEST_PGPORT:-54329}
    PGUSER=${PGCDC_TEST_PGUSER:-postgres}
    TANSU=${PGCDC_TEST_TANSU:-tansu}
    # libpq's default, prefer, means TLS whenever the server offers it (the test cluster does).
    # psql, pg_recvlogical and pgbench read PGSSLMODE; pgcdc gets it in its conninfo.
    SSLMODE=${BENCH_SSLMODE:-prefer}
    export PGSSLMODE=$SSLMODE
    CONNINFO="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$DB sslmode=$SSLMODE"

    TIME_BIN=/usr/bin/time
    if ! "$TIME_BIN" -f '%M' true >/dev/null 2>&1; then
        log "installing GNU time from Debian"
        local sudo=()
        [ "$(id -u)" -eq 0 ] || sudo=(sudo)
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >&2
    fi
}

psql_db() { # psql on the bench database: quiet, unaligned, stops at the first error
    "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d "$DB" "$@"
}
psql_admin() {
    "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres "$@"
}

# Drops the bench database's slots (ending a walsender that still holds one).
drop_slots() {
    psql_admin -v db="$DB" >/dev/null <<'SQL'
SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
 WHERE database = :'db' AND active_pid IS NOT NULL;
SELECT pg_sleep(0.2);
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
 WHERE database = :'db' AND NOT active;
SQL
}

# A fresh, empty bench database (dropping what a previous run may have left).
recreate_db() {
    drop_slots
    psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
}
drop_db() {
    drop_slots 2>/dev/null || true
    psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}

create_slot() { psql_db -c "SELECT pg_create_logical_replication_slot('$1', 'pgoutput')" >/dev/null; }
drop_slot() { psql_db -c "SELECT pg_drop_replication_slot('$1')" >/dev/null; }
current_lsn() { psql_db -c "SELECT pg_current_wal_lsn()"; }

# A private Kafka-protocol broker (tansu, memory storage), started fresh for each Kafka run so
# every run meets the same empty broker, and stopped after it. With BENCH_KAFKA set, that
# broker is used instead and nothing is started. Sets KAFKA to the bootstrap address.
broker_pid=""
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
broker_start() {
    if [ -n "${BENCH_KAFKA:-}" ]; then
        KAFKA=$BENCH_KAFKA
        return
    fi
    local port dir=$work/tansu
    port=$(free_port)
    mkdir -p "$dir"
    rm -f "$dir/pid"
    # The inner shell writes its own pid, then becomes the broker: the pid file names it.
    # shellcheck disable=SC2016
    (cd "$dir" && setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/pid" \
        "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "memory://tansu/" \
        >>"$dir/log" 2>&1 </dev/null &)
    for _ in $(seq 1 100); do
        broker_pid=$(cat "$dir/pid" 2>/dev/null || true)
        if [ -n "$broker_pid" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            KAFKA=127.0.0.1:$port
            return
        fi
        sleep 0.1
    done
    tail -20 "$dir/log" >&2 || true
    die "tansu did not start (log: $dir/log)"
}
broker_stop() {
    [ -n "$broker_pid" ] || return 0
    kill "$broker_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$broker_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$broker_pid" 2>/dev/null || true
    broker_pid=""
}
# CPU seconds (user+sys) the private broker has used so far; nothing with BENCH_KAFKA.
broker_cpu() {
    [ -n "$broker_pid" ] && [ -r "/proc/$broker_pid/stat" ] || return 0
    # utime and stime are fields 14 and 15 of /proc/PID/stat: 12 and 13 after the ") ".
    sed 's/^.*) //' "/proc/$broker_pid/stat" |
        awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($12 + $13) / t }'
}

# timed ERRFILE CMD...: runs CMD under GNU time and `timeout` (which passes SIGINT on to CMD),
# stdin from /dev/null, stdout to /dev/null, stderr to ERRFILE. Sets T_WALL (s, from the
# clock here), T_CPU (user+sys s of CMD and its threads) and T_RSS (peak resident KB).
# Dies, showing the end of ERRFILE, when CMD fails.
timed() {
    local err=$1 rc=0 t0 t1 user sys
    shift
    t0=$(now)
    "$TIME_BIN" -o "$err.time" -f '%U %S %M' timeout -s INT "$RUN_TIMEOUT" "$@" \
        </dev/null >/dev/null 2>"$err" || rc=$?
    t1=$(now)
    if [ "$rc" -ne 0 ]; then
        tail -20 "$err" >&2
        die "'$*' failed with status $rc (log: $err)"
    fi
    read -r user sys T_RSS < <(tail -n 1 "$err.time")
    T_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    T_CPU=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
}

# pgcdc's log without colour codes.
clean_log() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

# How many records pgcdc's sink acknowledged, from its log (0 if it did not say).
pgcdc_records() {
    local n
    n=$(clean_log "$1" | grep -o 'SinkSummary { records: [0-9]*' | grep -o '[0-9]*$' | tail -n 1 || true)
    echo "${n:-0}"
}
