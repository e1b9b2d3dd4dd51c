#!/usr/bin/env bash
# bench/run.sh — pgcdc against PostgreSQL's own ceilings, measured back to back in one run.
#
#   bash bench/run.sh            # full run (1M rows, 3 rounds; ~15 min on 2 cores), writes bench/RESULTS.md
#   bash bench/run.sh --smoke    # tiny sizes, checks the plumbing end to end (< 60 s once built)
#
# What it measures (see bench/README.md for the method and its limits):
#   snapshot   psql "COPY t TO STDOUT" > /dev/null          (reference)
#              pgcdc run --snapshot-only --sink stdout > /dev/null, and to Kafka
#              for a ~200-byte row table and a ~2 KB row table;
#   streaming  N changes in one transaction, and in N/10 transactions of 10 rows, read by
#              pg_recvlogical (pgoutput) > /dev/null              (reference)
#              pgcdc run --snapshot never --stop-lsn <lsn> > /dev/null, and to Kafka;
#              every reader has its own slot, created before the changes, so all decode the
#              same WAL;
#   latency    pgbench at a steady rate for a while; commit -> Kafka figures per event, and
#              read-your-writes: a probe that commits, takes its LSN and asks pgcdc's /wait
#              (commit -> wait returns), BENCH_WAIT_RATE times a second during the load.
# Each process is run under GNU time: wall seconds, CPU seconds (user+sys of the process and
# its threads), peak RSS. Every pgcdc figure is printed as a ratio to the reference of the
# same run, because this machine is shared and absolute timings drift between runs.
#
# Settings (environment):
#   BENCH_ROWS=1000000          rows of the ~200-byte table = changes per streaming case
#   BENCH_WIDE_ROWS=ROWS/4      rows of the ~2 KB table
#   BENCH_TXN_ROWS=10           rows per transaction in the small-transactions case
#   BENCH_SNAPSHOT_WORKERS=1    pgcdc's --snapshot-workers in the snapshot cases
#   BENCH_REPEAT=3              rounds of every snapshot and streaming measurement (--smoke: 1);
#                               the report shows medians (peak RSS: the highest)
#   BENCH_LATENCY_SECONDS=60    length of the steady load;  BENCH_LATENCY_RATE=2000 tx/s
#   BENCH_LATENCY_ROWS=100000   rows of the table the load updates
#   BENCH_WAIT_RATE=20          read-your-writes probes per second during the load
#   BENCH_KAFKA=host:port       use this broker instead of starting a private tansu
#   BENCH_SECTIONS=snapshot,streaming,latency   which parts to run
#   BENCH_PROFILE=release       cargo profile to build and measure (--smoke: dev)
#   BENCH_RESULTS=bench/RESULTS.md   where to write the report (--smoke: the work directory)
#   BENCH_DB=pgcdc_bench        database created (and dropped) for the run
#   BENCH_TIMEOUT=3600          seconds any single measured command may take
#   BENCH_KEEP=1                keep the database and the work directory afterwards
# Options: --smoke (see above), --no-build (use the binaries already built).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

# --- options --------------------------------------------------------------------------------
smoke=0
build=1
for arg in "$@"; do
    case $arg in
        --smoke) smoke=1 ;;
        --no-build) build=0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $arg (see --help)" ;;
    esac
done

if [ "$smoke" -eq 1 ]; then
    ROWS=${BENCH_ROWS:-2000}
    LAT_SECONDS=${BENCH_LATENCY_SECONDS:-2}
    LAT_RATE=${BENCH_LATENCY_RATE:-200}
    PROFILE=${BENCH_PROFILE:-dev}
    DB=${BENCH_DB:-pgcdc_bench_smoke}
else
    ROWS=${BENCH_ROWS:-1000000}
    LAT_SECONDS=${BENCH_LATENCY_SECONDS:-60}
    LAT_RATE=${BENCH_LATENCY_RATE:-2000}
    PROFILE=${BENCH_PROFILE:-release}
    DB=${BENCH_DB:-pgcdc_bench}
fi
WIDE_ROWS=${BENCH_WIDE_ROWS:-$((ROWS / 4))}
TXN_ROWS=${BENCH_TXN_ROWS:-10}
REPEAT=${BENCH_REPEAT:-$([ "$smoke" -eq 1 ] && echo 1 || echo 3)}
LAT_ROWS=${BENCH_LATENCY_ROWS:-100000}
WAIT_RATE=${BENCH_WAIT_RATE:-20}
[ "$LAT_ROWS" -le "$ROWS" ] || LAT_ROWS=$ROWS
SECTIONS=${BENCH_SECTIONS:-snapshot,streaming,latency}
RUN_TIMEOUT=${BENCH_TIMEOUT:-3600}
KEEP=${BENCH_KEEP:-0}
SNAPSHOT_WORKERS=${BENCH_SNAPSHOT_WORKERS:-1}
for n in ROWS WIDE_ROWS TXN_ROWS REPEAT LAT_SECONDS LAT_RATE LAT_ROWS WAIT_RATE RUN_TIMEOUT; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive whole number (got '${!n}')"
done
[[ $DB =~ ^[a-z_][a-z0-9_]*$ ]] || die "BENCH_DB must be a plain lower-case identifier"
section() { [[ ,$SECTIONS, == *,$1,* ]]; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pgcdc-bench.XXXXXX")
if [ "$smoke" -eq 1 ]; then
    RESULTS=${BENCH_RESULTS:-$work/RESULTS.md}
else
    RESULTS=${BENCH_RESULTS:-$repo/bench/RESULTS.md}
fi

# --- the test environment: PostgreSQL, tansu, GNU time --------------------------------------
bench_env

# --- build ---------------------------------------------------------------------------------
target=${CARGO_TARGET_DIR:-$repo/target}
case $PROFILE in
    dev) bindir=$target/debug ;;
    *) bindir=$target/$PROFILE ;;
esac
PGCDC=$bindir/pgcdc
LATENCY=$bindir/examples/bench-latency
WAIT_PROBE=$bindir/examples/bench-wait-latency
if [ "$build" -eq 1 ]; then
    log "building pgcdc (profile $PROFILE)"
    cargo build --locked --profile "$PROFILE" --bin pgcdc --example bench-latency \
        --example bench-wait-latency >&2
fi
# The source measured: taken now, as the binaries are built, not when the report is written.
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo "?")
git -C "$repo" diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
if ! [ -x "$PGCDC" ] || ! [ -x "$LATENCY" ] || ! [ -x "$WAIT_PROBE" ]; then
    die "binaries missing in $bindir (build, or drop --no-build)"
fi

# --- helpers -------------------------------------------------------------------------------
# The latency run's pgcdc runs in the background as time -> timeout -> pgcdc. GNU time ignores
# SIGINT; timeout passes it on to pgcdc, which then stops gracefully.
bg_time_pid=""
stop_bg() {
    [ -n "$bg_time_pid" ] || return 0
    local timeout_pid
    timeout_pid=$(pgrep -P "$bg_time_pid" | head -n 1 || true)
    [ -z "$timeout_pid" ] || kill -INT "$timeout_pid" 2>/dev/null || true
    wait "$bg_time_pid" || true
    bg_time_pid=""
}
cleanup() {
    local rc=$?
    stop_bg
    broker_stop
    [ "$KEEP" = 1 ] || drop_db
    # Kept when something failed, when asked, or when the report was written inside it.
    if [ "$rc" -eq 0 ] && [ "$KEEP" != 1 ] && [[ $RESULTS != "$work"/* ]]; then
        rm -rf "$work"
    else
        log "logs and measurements kept in $work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# measure ID LABEL READER EXPECTED CMD...: runs CMD (stdout to /dev/null) under GNU time and
# `timeout`, and appends one line to results.tsv:
#   id  label  reader  rows  wall_s  cpu_s  rss_kb  broker_cpu_s  startup_s  status
# `rows` is what the reader reported (pgcdc's log) or EXPECTED when it reports nothing.
# `startup_s` is pgcdc's time from start to its first row (slot, topics, connections).
measure() {
    local id=$1 label=$2 reader=$3 expected=$4
    shift 4
    local err=$work/$id.err b0 b1 bcpu="" rows=$expected startup="" status=ok
    log "$id: $label — $reader"
    b0=$(broker_cpu)
    timed "$err" "$@"
    b1=$(broker_cpu)
    if [ -n "$b0" ] && [ -n "$b1" ]; then
        bcpu=$(awk -v a="$b0" -v b="$b1" 'BEGIN { printf "%.2f", b - a }')
    fi
    if [[ $reader == pgcdc* ]]; then
        clean_log "$err" >"$work/$id.log"
        rows=$(pgcdc_records "$err")
        [ "$rows" -eq "$expected" ] || status="COUNT $rows != $expected"
        startup=$(log_gap "$work/$id.log" 'connecting to PostgreSQL' 'snapshot: reading table|streaming changes')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "$label" "$reader" "$rows" "$T_WALL" \
        "$T_CPU" "$T_RSS" "$bcpu" "$startup" "$status" >>"$work/results.tsv"
}

# The readers of a case, in the order of round $1: rotated left by one place per round, so
# that over 3 rounds each reader runs once first, once second and once third. A reader can pay
# for what the one before it left behind (pages still being written back, a broker just
# stopped); with a fixed order that cost always fell on the same reader.
rotated() { # round reader...
    local r=$1 n i
    shift
    n=$#
    for ((i = 0; i < n; i++)); do
        local j=$(((i + r - 1) % n + 1))
        printf '%s\n' "${!j}"
    done
}

# Seconds between the first log line matching $2 and the first matching $3 (pgcdc's log
# timestamps are RFC 3339 UTC).
log_gap() {
    local a b
    a=$(grep -E -m1 "$2" "$1" | cut -d' ' -f1 || true)
    b=$(grep -E -m1 "$3" "$1" | cut -d' ' -f1 || true)
    [ -n "$a" ] && [ -n "$b" ] || return 0
    awk -v a="$(date -d "$a" +%s.%N)" -v b="$(date -d "$b" +%s.%N)" 'BEGIN { printf "%.2f", b - a }'
}

wait_for_log() { # file pattern seconds
    for _ in $(seq 1 $(($3 * 10))); do
        clean_log "$1" 2>/dev/null | grep -Eq "$2" && return 0
        sleep 0.1
    done
    return 1
}

# --- the database and its datasets -------------------------------------------------------------
log "database $DB: $ROWS rows (~200 B), $WIDE_ROWS wide rows (~2 KB)"
recreate_db
gen_t0=$(now)
psql_db -v rows="$ROWS" -v wide_rows="$WIDE_ROWS" -v lat_rows="$LAT_ROWS" -f "$repo/bench/datasets.sql" >/dev/null
narrow_bytes=$(psql_db -c "SELECT pg_table_size('bench_narrow')")
wide_bytes=$(psql_db -c "SELECT pg_table_size('bench_wide')")
# Average row size as COPY text (what both COPY and pgoutput carry), from a sample.
row_bytes() { # table rows
    local n=$(($2 < 10000 ? $2 : 10000))
    echo $(($(psql_db -c "COPY (SELECT * FROM $1 LIMIT $n) TO STDOUT" | wc -c) / n))
}
narrow_row=$(row_bytes bench_narrow "$ROWS")
wide_row=$(row_bytes bench_wide "$WIDE_ROWS")
log "datasets ready in $(awk -v a="$gen_t0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }') s"

: >"$work/results.tsv"
to_null=(--source "$CONNINFO" --sink stdout --progress-file "$work/progress.json")
to_kafka=(--source "$CONNINFO")

# --- snapshot ------------------------------------------------------------------------------
# BENCH_REPEAT rounds of reference, pgcdc → /dev/null, pgcdc → Kafka, one after the other; the
# order turns by one place each round (see `rotated`).
snapshot_case() { # id-prefix label table rows
    local id=$1 label=$2 table=$3 rows=$4 r reader
    # pgcdc publishes the rows and the table's snapshot marker (one partition).
    local records=$((rows + 1))
    # Warm the caches once, untimed, so the reference does not pay for a cold read.
    psql_db -c "COPY $table TO STDOUT" >/dev/null
    for r in $(seq 1 "$REPEAT"); do
        for reader in $(rotated "$r" ref null kafka); do
            case $reader in
                ref) measure "$id-ref-$r" "$label" "psql COPY" "$rows" \
                    "$PGBIN/psql" -X -q -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d "$DB" \
                    -c "COPY $table TO STDOUT" ;;
                null) measure "$id-null-$r" "$label" "pgcdc → /dev/null" "$records" \
                    "$PGCDC" run "${to_null[@]}" --snapshot-only --table "public.$table" \
                    --publication "${table}_pub" --slot "${DB}_snap" \
                    --snapshot-workers "$SNAPSHOT_WORKERS" ;;
                kafka)
                    broker_start
                    measure "$id-kafka-$r" "$label" "pgcdc → Kafka" "$records" \
                        "$PGCDC" run "${to_kafka[@]}" --kafka "$KAFKA" --snapshot-only \
                        --table "public.$table" --publication "${table}_pub" --slot "${DB}_snap" \
                        --topic-prefix "$id-$r" --snapshot-workers "$SNAPSHOT_WORKERS"
                    broker_stop
                    ;;
            esac
        done
    done
}
if section snapshot; then
    snapshot_case snap-narrow "snapshot, ~${narrow_row} B rows" bench_narrow "$ROWS"
    snapshot_case snap-wide "snapshot, ~${wide_row} B rows" bench_wide "$WIDE_ROWS"
fi

# --- streaming -----------------------------------------------------------------------------
# Creates one slot per reader and round, makes the changes (SQL on stdin), then runs the
# readers one after the other, BENCH_REPEAT rounds, each up to the WAL position reached after
# the changes; the order turns by one place each round (see `rotated`).
streaming_case() { # id label changes
    local id=$1 label=$2 changes=$3 end r slot reader
    slot=${DB}_${id//-/_}
    for r in $(seq 1 "$REPEAT"); do
        create_slot "${slot}_ref_$r"
        create_slot "${slot}_null_$r"
        create_slot "${slot}_kafka_$r"
    done
    log "$id: making $changes changes"
    psql_db >/dev/null
    end=$(current_lsn)
    for r in $(seq 1 "$REPEAT"); do
        for reader in $(rotated "$r" ref null kafka); do
            case $reader in
                ref) measure "$id-ref-$r" "$label" "pg_recvlogical" "$changes" \
                    "$PGBIN/pg_recvlogical" -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d "$DB" \
                    --slot "${slot}_ref_$r" --start -o proto_version=1 \
                    -o publication_names=bench_narrow_pub -E "$end" -F 0 -f /dev/null ;;
                null) measure "$id-null-$r" "$label" "pgcdc → /dev/null" "$changes" \
                    "$PGCDC" run "${to_null[@]}" --snapshot never --stop-lsn "$end" \
                    --table public.bench_narrow --publication bench_narrow_pub \
                    --slot "${slot}_null_$r" ;;
                kafka)
                    broker_start
                    measure "$id-kafka-$r" "$label" "pgcdc → Kafka" "$changes" \
                        "$PGCDC" run "${to_kafka[@]}" --kafka "$KAFKA" --snapshot never \
                        --stop-lsn "$end" --table public.bench_narrow \
                        --publication bench_narrow_pub --slot "${slot}_kafka_$r" \
                        --topic-prefix "$id-$r"
                    broker_stop
                    ;;
            esac
            drop_slot "${slot}_${reader}_$r"
        done
    done
}
if section streaming; then
    streaming_case stream-1tx "stream, 1 txn × $ROWS rows" "$ROWS" \
        <<<"UPDATE bench_narrow SET n = n + 1;"
    psql_db -c "VACUUM bench_narrow" >/dev/null
    txns=$(((ROWS + TXN_ROWS - 1) / TXN_ROWS))
    streaming_case stream-small "stream, $txns txns × $TXN_ROWS rows" "$ROWS" \
        <<<"CALL bench_small_txns($ROWS, $TXN_ROWS);"
fi

# --- latency -------------------------------------------------------------------------------
# pgcdc streams bench_lat to Kafka while pgbench updates one random row per transaction at a
# fixed rate; bench-latency reads the topic as it fills and compares each event's commit time
# with its Kafka timestamp (when pgcdc produced it) and with when it was received. Beside the
# load, bench-wait-latency measures read-your-writes: commit, insert LSN, pgcdc's /wait; its
# writes are events of the same topic, expected by bench-latency with the load's.
if section latency; then
    broker_start
    lat_slot=${DB}_lat
    create_slot "$lat_slot"
    lat_err=$work/lat-pgcdc.err
    metrics_port=$(free_port)
    log "latency: pgcdc streaming to Kafka; pgbench at $LAT_RATE tx/s for $LAT_SECONDS s"
    "$TIME_BIN" -o "$work/lat-pgcdc.time" -f '%U %S %M' timeout -s INT "$RUN_TIMEOUT" \
        "$PGCDC" run "${to_kafka[@]}" --kafka "$KAFKA" --snapshot never --table public.bench_lat \
        --publication bench_lat_pub --slot "$lat_slot" --topic-prefix lat \
        --metrics-addr "127.0.0.1:$metrics_port" >/dev/null 2>"$lat_err" &
    bg_time_pid=$!
    wait_for_log "$lat_err" 'streaming changes' 60 || die "pgcdc did not start streaming (log: $lat_err)"
    "$LATENCY" "$KAFKA" lat.public.bench_lat "$work/lat-ready" "$work/lat-expected" \
        "$((LAT_SECONDS + 300))" >"$work/lat.out" 2>"$work/lat-consumer.err" &
    consumer_pid=$!
    # One warm-up transaction: its event pays for the first produce to the new topic.
    psql_db -c "UPDATE bench_lat SET n = n + 1 WHERE id = 1" >/dev/null
    for _ in $(seq 1 300); do [ -e "$work/lat-ready" ] && break; sleep 0.1; done
    [ -e "$work/lat-ready" ] || die "bench-latency did not get ready (log: $work/lat-consumer.err)"
    cat >"$work/lat.pgbench" <<'SQL'
\set id random(1, :rows)
UPDATE bench_lat SET n = n + 1 WHERE id = :id;
SQL
    b0=$(broker_cpu)
    "$WAIT_PROBE" "$CONNINFO" "http://127.0.0.1:$metrics_port" "$LAT_SECONDS" "$WAIT_RATE" \
        "$LAT_ROWS" "$PGCDC" "$lat_slot" >"$work/wait.out" 2>"$work/wait.err" &
    probe_pid=$!
    "$PGBIN/pgbench" -n -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -f "$work/lat.pgbench" \
        -D rows="$LAT_ROWS" -R "$LAT_RATE" -T "$LAT_SECONDS" -c 4 -j 2 "$DB" \
        >"$work/lat-pgbench.out" 2>&1 || die "pgbench failed: $(tail -5 "$work/lat-pgbench.out")"
    lat_txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$work/lat-pgbench.out")
    lat_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/lat-pgbench.out" | head -n 1)
    wait "$probe_pid" || die "bench-wait-latency failed: $(tail -5 "$work/wait.err")"
    probe_writes=$(sed -n 's/^writes=//p' "$work/wait.out")
    echo "$((lat_txns + probe_writes))" >"$work/lat-expected"
    wait "$consumer_pid" || die "bench-latency failed: $(tail -5 "$work/lat-consumer.err")"
    # pgcdc's own commit -> acknowledgement histogram (delivery reports, acks=all): quantiles
    # as the upper bound of the bucket that holds them.
    python3 - "$metrics_port" >"$work/ack.out" <<'PY' || die "cannot read pgcdc's /metrics"
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
name = "pgcdc_commit_to_ack_milliseconds"
buckets, total, count = [], 0.0, 0
for line in text.splitlines():
    if line.startswith(name + "_bucket{le=\""):
        le = line.split('"')[1]
        buckets.append((float("inf") if le == "+Inf" else float(le), int(line.split()[-1])))
    elif line.startswith(name + "_sum "):
        total = float(line.split()[-1])
    elif line.startswith(name + "_count "):
        count = int(line.split()[-1])
def q(p):
    for le, c in buckets:
        if count and c >= p * count:
            return "≤ %g" % le
    return "?"
print(f"ack_p50={q(0.5)}\nack_p99={q(0.99)}\nack_max={q(1.0)}")
print("ack_mean=%.1f" % (total / count if count else 0))
print(f"ack_count={count}")
PY
    b1=$(broker_cpu)
    stop_bg
    broker_stop
    drop_slot "$lat_slot"
    read -r user sys rss < <(tail -n 1 "$work/lat-pgcdc.time")
    lat_cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    lat_rss=$rss
    lat_bcpu=""
    [ -z "$b0" ] || lat_bcpu=$(awk -v a="$b0" -v b="$b1" 'BEGIN { printf "%.2f", b - a }')
    lat() { sed -n "s/^$1=//p" "$work/lat.out" "$work/ack.out" "$work/wait.out"; }
fi

# --- report --------------------------------------------------------------------------------
# One line per case and reader: medians of wall and CPU time over the rounds, the highest
# peak RSS, the first failed check if any; in the order the cases ran.
python3 - "$work/results.tsv" >"$work/summary.tsv" <<'PY'
import statistics, sys
groups = {}
for line in open(sys.argv[1], encoding="utf-8"):
    f = line.rstrip("\n").split("\t")
    groups.setdefault((f[1], f[2]), []).append(f)
for (label, reader), runs in groups.items():
    med = lambda i: statistics.median(float(r[i]) for r in runs)
    opt = lambda i: ("%.2f" % statistics.median(float(r[i]) for r in runs)) if runs[0][i] else ""
    bad = [r[9] for r in runs if r[9] != "ok"]
    rounds = " / ".join("%.1f" % float(r[4]) for r in runs)
    print("\t".join([runs[0][0], label, reader, runs[0][3], "%.3f" % med(4), "%.2f" % med(5),
                     str(max(int(r[6]) for r in runs)), opt(7), opt(8), bad[0] if bad else "ok",
                     rounds]))
PY
mb() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
fmt_rate() { awk -v r="$1" 'BEGIN { if (r >= 1e6) printf "%.2fM", r / 1e6; else printf "%.0fk", r / 1e3 }'; }

# The per-run table (markdown, also readable on a terminal).
table=$work/table.md
{
    echo "| case | reader | rows | wall s | rows/s | × ref | CPU s | CPU × ref | peak RSS MB | broker CPU s | startup s | wall s per round |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    awk -F'\t' '
        { rate = ($5 > 0) ? $4 / $5 : 0 }
        $3 == "psql COPY" || $3 == "pg_recvlogical" { ref_rate[$2] = rate; ref_cpu[$2] = $6 }
        {
            ratio = (ref_rate[$2] > 0) ? sprintf("%.2f×", rate / ref_rate[$2]) : "—"
            cratio = (ref_cpu[$2] > 0) ? sprintf("%.1f×", $6 / ref_cpu[$2]) : "—"
            if ($3 == "psql COPY" || $3 == "pg_recvlogical") { ratio = "ref"; cratio = "ref" }
            r = (rate >= 1e6) ? sprintf("%.2fM", rate / 1e6) : sprintf("%.0fk", rate / 1e3)
            note = ($10 == "ok") ? "" : " **" $10 "**"
            printf "| %s | %s | %d | %.2f | %s | %s | %.2f | %s | %.0f | %s | %s | %s |\n",
                $2, $3 note, $4, $5, r, ratio, $6, cratio, $7 / 1024,
                ($8 == "" ? "—" : $8), ($9 == "" ? "—" : $9), $11
        }' "$work/summary.tsv"
} >"$table"

# The headline: each pgcdc throughput as a ratio to its reference, against the issue's targets.
headline=$work/headline.md
{
    echo "| pgcdc ÷ reference (rows/s) | ratio | target | |"
    echo "|---|---:|---:|---|"
    awk -F'\t' '
        { rate = ($5 > 0) ? $4 / $5 : 0 }
        $3 == "psql COPY" || $3 == "pg_recvlogical" { ref_rate[$2] = rate; ref_name[$2] = $3; next }
        {
            target = ($3 ~ /Kafka/) ? 0.7 : 0.9
            r = (ref_rate[$2] > 0) ? rate / ref_rate[$2] : 0
            printf "| %s, %s vs %s | %.2f× | ≥ %.1f× | %s |\n", $2, $3, ref_name[$2], r, target,
                (r >= target) ? "met" : "not yet"
        }' "$work/summary.tsv"
    if section latency; then
        p99=$(lat ack_p99)
        printf '| commit → Kafka acknowledgement p99 at %s tx/s (pgcdc'"'"'s histogram) | %s ms | ≤ 50 ms | %s |\n' \
            "$LAT_RATE" "$p99" "$(awk -v p="${p99#≤ }" 'BEGIN { print (p != "" && p + 0 <= 50) ? "met" : "not yet" }')"
        printf '| commit → `/wait` returns p99 at %s tx/s (read-your-writes probe, %s waits, p50 %s ms) | %s ms | — | |\n' \
            "$LAT_RATE" "$(lat wait_samples)" "$(lat wait_p50)" "$(lat wait_p99)"
    fi
    max_rss=$(awk -F'\t' '$3 ~ /^pgcdc/ && $7 > m { m = $7 } END { print m + 0 }' "$work/summary.tsv")
    [ -z "${lat_rss:-}" ] || [ "$lat_rss" -le "$max_rss" ] || max_rss=$lat_rss
    printf '| pgcdc peak RSS, worst run | %s MB | ≤ 100 MB | %s |\n' "$(mb "$max_rss")" \
        "$(awk -v k="$max_rss" 'BEGIN { print (k <= 100 * 1024) ? "met" : "not yet" }')"
} >"$headline"

latency_md=$work/latency.md
if section latency; then
    {
        echo "Steady load: pgbench, one single-row UPDATE per transaction, target $LAT_RATE tx/s for"
        echo "$LAT_SECONDS s; achieved ${lat_tps:-?} tx/s, $lat_txns transactions, plus $probe_writes of the read-your-writes"
        echo "probe; $(lat records) events read back."
        echo
        echo "| commit → … (ms) | p50 | p99 | max | mean |"
        echo "|---|---:|---:|---:|---:|"
        echo "| Kafka record timestamp (CreateTime: when pgcdc produced the record; lower bound of ack) | $(lat create_p50) | $(lat create_p99) | $(lat create_max) | $(lat create_mean) |"
        echo "| consumer receipt (broker has stored it; upper bound of ack, includes fetch delay) | $(lat received_p50) | $(lat received_p99) | $(lat received_max) | $(lat received_mean) |"
        echo "| **acknowledgement** (pgcdc's \`pgcdc_commit_to_ack_milliseconds\`: all of the transaction's delivery reports in, \`acks=all\`; bucket bounds) | $(lat ack_p50) | $(lat ack_p99) | $(lat ack_max) | $(lat ack_mean) |"
        echo
        echo "Read-your-writes during the same load: $WAIT_RATE times a second, on a connection of its own, the"
        echo "probe updates a row of \`bench_lat\`, \`COMMIT\`s, takes \`pg_current_wal_insert_lsn()\` and waits;"
        echo "from \`COMMIT\` returning to the wait's success. $(lat wait_failed) wait(s) failed."
        echo
        echo "| commit → wait returns (ms) | count | p50 | p99 | max | mean |"
        echo "|---|---:|---:|---:|---:|---:|"
        echo "| **\`GET /wait?lsn=…\`** on \`--metrics-addr\` (long poll, one HTTP connection per wait; includes the LSN query, mean $(lat lsn_query_mean) ms) | $(lat wait_samples) | $(lat wait_p50) | $(lat wait_p99) | $(lat wait_max) | $(lat wait_mean) |"
        echo "| \`pgcdc wait --url …\` (process start included) | $(lat wait_cli_url_samples) | $(lat wait_cli_url_p50) | $(lat wait_cli_url_p99) | $(lat wait_cli_url_max) | $(lat wait_cli_url_mean) |"
        echo "| \`pgcdc wait --slot …\` (no \`--url\`: the slot's confirmed position, read every 50 ms; process start included) | $(lat wait_cli_slot_samples) | $(lat wait_cli_slot_p50) | $(lat wait_cli_slot_p99) | $(lat wait_cli_slot_max) | $(lat wait_cli_slot_mean) |"
        echo
        echo "pgcdc during the load: CPU $lat_cpu s over the run, peak RSS $(mb "$lat_rss") MB; broker CPU ${lat_bcpu:-—} s."
    } >"$latency_md"
fi

# Machine and versions.
pg_version=$(psql_db -c "SELECT version()")
pgcdc_version=$("$PGCDC" --version 2>/dev/null || echo "pgcdc ?")
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
mem_gb=$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
tansu_version=$("$TANSU" --version 2>/dev/null | head -n 1 || echo "?")
kafka_desc=${BENCH_KAFKA:-"private $tansu_version broker, memory storage, fresh for each run"}
load=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo "# pgcdc benchmark results"
    echo
    echo "Written by \`bash bench/run.sh$([ "$smoke" -eq 1 ] && echo " --smoke")\` on $(date -u '+%Y-%m-%d %H:%M UTC'). Method and limits: [README.md](README.md)."
    echo
    echo "- Machine: $(nproc) CPUs ($cpu_model), $mem_gb GB memory, $(uname -sr); load average at the end $load (other builds and tests were running: compare ratios, not absolute figures)"
    echo "- PostgreSQL: $pg_version"
    echo "- pgcdc: $pgcdc_version, commit $commit, cargo profile $PROFILE; snapshots with --snapshot-workers $SNAPSHOT_WORKERS"
    echo "- Kafka: $kafka_desc; pgcdc's default producer settings"
    echo "- PostgreSQL connections: sslmode=$SSLMODE for every tool (the test cluster offers TLS)"
    echo "- Data: $ROWS rows of ~$narrow_row B ($(mb $((narrow_bytes / 1024))) MB on disk), $WIDE_ROWS rows of ~$wide_row B ($(mb $((wide_bytes / 1024))) MB); streaming: $ROWS changes per case (UPDATEs, full new row); $REPEAT round(s) of each measurement$([ "$REPEAT" -gt 1 ] && echo ", medians shown")"
    echo
    echo "## Headline"
    echo
    cat "$headline"
    echo
    if [ -s "$work/summary.tsv" ]; then
        echo "## All runs"
        echo
        echo "CPU s: user+sys of the measured process only (for the references, psql or pg_recvlogical;"
        echo "the PostgreSQL backend/walsender is not counted for anyone). Startup: pgcdc's time from start"
        echo "to its first row (connections, slot, topics)."
        echo
        cat "$table"
    fi
    if section latency; then
        echo
        echo "## Latency"
        echo
        cat "$latency_md"
    fi
    if [ -f "$repo/bench/PROFILE.md" ] && [ "$smoke" -eq 0 ]; then
        echo
        echo "Hot spots: see [PROFILE.md](PROFILE.md)."
    fi
} >"$RESULTS"

echo
cat "$headline"
if [ -s "$work/summary.tsv" ]; then echo; cat "$table"; fi
if section latency; then echo; cat "$latency_md"; fi
echo
log "report written to $RESULTS"
if grep -q $'\tCOUNT' "$work/summary.tsv"; then
    die "a pgcdc run published a different number of rows than expected (see the table)"
fi
