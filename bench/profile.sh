#!/usr/bin/env bash
# bench/profile.sh — where pgcdc spends its time on the two /dev/null paths of bench/run.sh:
# the snapshot (--snapshot-only --sink stdout) and the stream (--stop-lsn --sink stdout, N
# changes in transactions of 10 rows).
#
#   bash bench/profile.sh            # PROFILE_ROWS=100000 rows and changes
#
# Two profilers, because each sees what the other cannot:
#   - valgrind --tool=callgrind: instructions per function, exact and independent of the load
#     on the machine (user space only; about 50x slower, so keep PROFILE_ROWS small);
#   - perf record -e cpu-clock: where the time goes, kernel included (syscalls, thread
#     wake-ups). This machine's VM has no hardware counters (`perf stat -e instructions`
#     is "not supported"), so perf samples a software clock.
# Reports (callgrind_annotate and perf report summaries) go to PROFILE_OUT (default: a new
# temporary directory), which is printed at the end. bench/PROFILE.md discusses the results.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

ROWS=${PROFILE_ROWS:-100000}
DB=${PROFILE_DB:-pgcdc_profile}
RUN_TIMEOUT=${BENCH_TIMEOUT:-3600}
out=${PROFILE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/pgcdc-profile.XXXXXX")}
mkdir -p "$out"
work=$out
command -v valgrind >/dev/null || die "valgrind is missing (apt-get install valgrind)"

trap 'drop_db' EXIT
bench_env
log "building pgcdc (release, with line tables for symbols)"
cargo build --locked --release --bin pgcdc >&2
PGCDC=${CARGO_TARGET_DIR:-$repo/target}/release/pgcdc

recreate_db
psql_db -v rows="$ROWS" -v wide_rows=1 -v lat_rows=1 -f "$repo/bench/datasets.sql" >/dev/null
for s in cg perf; do create_slot "${DB}_$s"; done
log "making $ROWS changes in transactions of 10 rows"
psql_db -c "CALL bench_small_txns($ROWS, 10)" >/dev/null
end=$(current_lsn)

common=(run --source "$CONNINFO" --sink stdout --progress-file "$out/progress.json"
    --table public.bench_narrow --publication bench_narrow_pub)
snapshot=("${common[@]}" --snapshot-only --slot "${DB}_snap")
stream_args() { echo --snapshot never --stop-lsn "$end" --slot "${DB}_$1"; }

# First N lines of stdin, reading all of it (head would break the pipe, and pipefail with it).
first() { awk -v n="$1" 'NR <= n'; }

summarize_callgrind() { # name
    local f=$out/$1.callgrind
    callgrind_annotate "$f" 2>/dev/null | sed -n '/^Ir/,$p' | first 45 >"$out/$1.self.txt"
    callgrind_annotate --inclusive=yes "$f" 2>/dev/null | sed -n '/^Ir/,$p' |
        grep -E 'PROGRAM TOTALS|pgcdc::|tokio_postgres|tokio_openssl|SSL_read|SslConnector::builder' |
        first 45 >"$out/$1.inclusive.txt"
}

log "callgrind: snapshot of $ROWS rows"
timed "$out/snapshot-callgrind.err" valgrind --tool=callgrind \
    --callgrind-out-file="$out/snapshot.callgrind" "$PGCDC" "${snapshot[@]}"
summarize_callgrind snapshot
log "callgrind: stream of $ROWS changes"
# shellcheck disable=SC2046
timed "$out/stream-callgrind.err" valgrind --tool=callgrind \
    --callgrind-out-file="$out/stream.callgrind" "$PGCDC" "${common[@]}" $(stream_args cg)
summarize_callgrind stream

if perf record -e cpu-clock -o /dev/null true >/dev/null 2>&1; then
    log "perf (cpu-clock): snapshot and stream"
    timed "$out/snapshot-perf.err" perf record -e cpu-clock -F 2000 -g \
        -o "$out/snapshot.perf" "$PGCDC" "${snapshot[@]}"
    # shellcheck disable=SC2046
    timed "$out/stream-perf.err" perf record -e cpu-clock -F 2000 -g \
        -o "$out/stream.perf" "$PGCDC" "${common[@]}" $(stream_args perf)
    for p in snapshot stream; do
        {
            echo "## by shared object"
            perf report -i "$out/$p.perf" --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | first 10
            echo "## by symbol"
            perf report -i "$out/$p.perf" --no-children --sort dso,sym -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | first 40
        } >"$out/$p.perf.txt"
    done
else
    log "perf cannot sample here; skipping it"
fi

for f in "$out"/*.txt; do
    echo "==== $f"
    cat "$f"
done
log "profiles and summaries in $out (callgrind_annotate / perf report them further)"
