#!/usr/bin/env bash
# bench/compare.sh — before/after figures for a change to pgcdc: two pgcdc binaries do the
# same work alternately, and the medians of their wall time, CPU seconds and peak RSS are
# compared.
#
#   cp target/release/pgcdc /tmp/pgcdc-before     # build, keep a copy, change, build again
#   bash bench/compare.sh /tmp/pgcdc-before target/release/pgcdc
#
# Cases (COMPARE_CASES, comma-separated; default snapshot,stream):
#   snapshot        pgcdc run --snapshot-only --sink stdout > /dev/null
#   stream          COMPARE_ROWS changes in transactions of 10 rows, then
#                   pgcdc run --snapshot never --stop-lsn <lsn> --sink stdout > /dev/null
#   snapshot-kafka, stream-kafka   the same to a private tansu broker, fresh for each run
# Settings: COMPARE_ROWS=200000 (rows, and changes), COMPARE_REPEAT=5 (runs per binary and case),
# BENCH_SSLMODE, BENCH_KAFKA as for bench/run.sh.
#
# The runs alternate (old new, new old, old new, ...) so that a change in the machine's load
# affects both binaries alike; every streaming run reads its own slot, all created before the
# changes, so every run decodes the same WAL.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

[ $# -eq 2 ] || die "usage: bash bench/compare.sh OLD_PGCDC NEW_PGCDC"
bins=("$1" "$2")
for b in "${bins[@]}"; do [ -x "$b" ] || die "$b is not an executable"; done
ROWS=${COMPARE_ROWS:-200000}
REPEAT=${COMPARE_REPEAT:-5}
CASES=${COMPARE_CASES:-snapshot,stream}
DB=${COMPARE_DB:-pgcdc_compare}
RUN_TIMEOUT=${BENCH_TIMEOUT:-3600}
has_case() { [[ ,$CASES, == *,$1,* ]]; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pgcdc-compare.XXXXXX")
cleanup() {
    local rc=$?
    broker_stop
    drop_db
    if [ "$rc" -eq 0 ]; then rm -rf "$work"; else log "logs kept in $work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bench_env
log "database $DB: $ROWS rows"
recreate_db
psql_db -v rows="$ROWS" -v wide_rows=1 -v lat_rows=1 -f "$repo/bench/datasets.sql" >/dev/null

# Streaming: one slot per future run, then the changes.
if has_case stream || has_case stream-kafka; then
    for r in $(seq 1 "$REPEAT"); do
        for i in 0 1; do
            has_case stream && create_slot "${DB}_null_${r}_$i"
            has_case stream-kafka && create_slot "${DB}_kafka_${r}_$i"
        done
    done
    log "making $ROWS changes in transactions of 10 rows"
    psql_db -c "CALL bench_small_txns($ROWS, 10)" >/dev/null
    end=$(current_lsn)
fi

# run_case CASE REP I: one run of binary I; appends "case  i  wall  cpu  rss" to results.tsv.
run_case() {
    local c=$1 r=$2 i=$3 bin=${bins[$3]} err=$work/$1-$2-$3.err
    local args=(run --source "$CONNINFO" --table public.bench_narrow --publication bench_narrow_pub)
    case $c in
        snapshot) args+=(--sink stdout --progress-file "$work/p.json" --snapshot-only --slot "${DB}_snap") ;;
        stream) args+=(--sink stdout --progress-file "$work/p.json" --snapshot never --stop-lsn "$end" --slot "${DB}_null_${r}_$i") ;;
        snapshot-kafka) args+=(--snapshot-only --slot "${DB}_snap") ;;
        stream-kafka) args+=(--snapshot never --stop-lsn "$end" --slot "${DB}_kafka_${r}_$i") ;;
        *) die "unknown case $c" ;;
    esac
    if [[ $c == *-kafka ]]; then
        broker_start
        args+=(--kafka "$KAFKA" --topic-prefix "cmp$r$i")
    fi
    timed "$err" "$bin" "${args[@]}"
    broker_stop
    local n
    n=$(pgcdc_records "$err")
    # A snapshot may add one snapshot-complete marker for the table (pgcdc since the markers).
    [ "$n" -eq "$ROWS" ] || { [[ $c == snapshot* ]] && [ "$n" -eq $((ROWS + 1)) ]; } ||
        die "$c with ${bins[$i]} published $n records, expected $ROWS (log: $err)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$i" "$T_WALL" "$T_CPU" "$T_RSS" >>"$work/results.tsv"
    log "$c #$r ${bins[$i]}: ${T_WALL} s, CPU ${T_CPU} s, RSS $((T_RSS / 1024)) MB"
}

: >"$work/results.tsv"
for c in ${CASES//,/ }; do
    for r in $(seq 1 "$REPEAT"); do
        # Alternate which binary goes first.
        if [ $((r % 2)) -eq 1 ]; then order=(0 1); else order=(1 0); fi
        for i in "${order[@]}"; do run_case "$c" "$r" "$i"; done
    done
done

echo
echo "old: ${bins[0]}"
echo "new: ${bins[1]}"
echo "$ROWS rows per run, median of $REPEAT runs each, alternating; sslmode=$SSLMODE"
echo
echo "| case | wall s old → new | CPU s old → new | peak RSS MB old → new |"
echo "|---|---|---|---|"
for c in ${CASES//,/ }; do
    median() { # column binary
        awk -F'\t' -v c="$c" -v i="$2" -v k="$1" '$1 == c && $2 == i { print $k }' "$work/results.tsv" |
            sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
    }
    row() { # column scale
        local a b
        a=$(median "$1" 0)
        b=$(median "$1" 1)
        awk -v a="$a" -v b="$b" -v s="$2" 'BEGIN { printf "%.2f → %.2f (%+.0f%%)", a / s, b / s, (a > 0) ? (b - a) * 100 / a : 0 }'
    }
    echo "| $c | $(row 3 1) | $(row 4 1) | $(row 5 1024) |"
done
