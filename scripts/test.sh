#!/usr/bin/env bash
# THE test command (README, CI): prepares this machine idempotently with scripts/test-env.sh
# (PostgreSQL cluster, Kafka-protocol broker, packages), then runs every check and test.
set -euo pipefail
cd "$(dirname "$0")/.."

env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
bash scripts/test-env.sh >"$env_file"
# shellcheck disable=SC1090
source "$env_file"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets -- --test-threads "${PGCDC_TEST_THREADS:-4}"

# Opt-in: bench/run.sh --smoke end to end in under 60 s (starts its own broker, ~15 s).
if [ "${PGCDC_BENCH_SMOKE:-0}" = 1 ]; then
    echo "== bench smoke"
    bash bench/smoke.sh
fi
