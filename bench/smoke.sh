#!/usr/bin/env bash
# bench/smoke.sh — checks that `bench/run.sh --smoke` works end to end, within 60 seconds.
#
# Opt-in from scripts/test.sh (PGCDC_BENCH_SMOKE=1); off by default because the full test run
# does not need it and it starts a broker of its own. Expects the test environment
# (scripts/test-env.sh); bench/run.sh prepares it when PGCDC_TEST_* is not set.
set -euo pipefail
cd "$(dirname "$0")/.."

BUDGET=60

# The build is not part of the budget: the dev profile is what `cargo test` has just built.
cargo build --locked --bin pgcdc --example bench-latency --example bench-wait-latency

out=$(mktemp -d "${TMPDIR:-/tmp}/pgcdc-bench-smoke.XXXXXX")
trap 'rm -rf "$out"' EXIT

start=$(date +%s)
if ! BENCH_RESULTS=$out/RESULTS.md timeout -s INT "$BUDGET" \
    bash bench/run.sh --smoke --no-build >"$out/stdout" 2>"$out/stderr"; then
    tail -30 "$out/stderr" >&2
    echo "bench smoke: bench/run.sh --smoke failed or took longer than $BUDGET s" >&2
    exit 1
fi
elapsed=$(($(date +%s) - start))

# Every case must have produced its line, and the latency run must have read its events back.
missing=()
for want in "snapshot, " "stream, 1 txn" "stream, " "pgcdc → /dev/null" "pgcdc → Kafka" \
    "psql COPY" "pg_recvlogical" "commit → Kafka acknowledgement p99" "commit → \`/wait\` returns p99" \
    " 0 wait(s) failed" "pgcdc peak RSS"; do
    grep -qF "$want" "$out/RESULTS.md" || missing+=("$want")
done
if [ "$(grep -c 'pgcdc → ' "$out/RESULTS.md")" -lt 16 ]; then
    missing+=("8 pgcdc runs in the headline and 8 in the table")
fi
if [ ${#missing[@]} -gt 0 ]; then
    cat "$out/RESULTS.md" >&2
    printf 'bench smoke: RESULTS.md lacks: %s\n' "${missing[*]}" >&2
    exit 1
fi
echo "bench smoke: ok in ${elapsed}s (budget ${BUDGET}s)"
