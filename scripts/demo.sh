#!/usr/bin/env bash
# Runs pgcdc end to end on this machine, without Docker: the private PostgreSQL cluster and the
# broker from scripts/test-env.sh, a demo database seeded from sql/demo.sql, then
#   1. pgcdc publishes the snapshot to Kafka and stops at the current WAL position;
#   2. some changes are committed, and pgcdc resumes from its slot and publishes them;
#   3. the same pipeline to stdout, for a look at the events.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash scripts/test-env.sh)"
cargo build --quiet --release
PGCDC=target/release/pgcdc
PSQL=("$PGCDC_TEST_PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGCDC_TEST_PGHOST" -p "$PGCDC_TEST_PGPORT" -U "$PGCDC_TEST_PGUSER")

db=pgcdc_demo
"${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('demo', 'demo_stdout')" >/dev/null
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
"${PSQL[@]}" -d $db -f sql/demo.sql >/dev/null

source="host=$PGCDC_TEST_PGHOST port=$PGCDC_TEST_PGPORT user=$PGCDC_TEST_PGUSER dbname=$db"
prefix="demo$(date +%s)"
common=(--source "$source" --slot demo --publication demo --topic-prefix "$prefix"
        --table public.customers --table public.orders)

echo "== 1. snapshot to Kafka ($PGCDC_TEST_KAFKA), topics $prefix.public.*"
$PGCDC run "${common[@]}" --kafka "$PGCDC_TEST_KAFKA" --stop-lsn now

echo "== 2. changes, streamed from the slot"
"${PSQL[@]}" -d $db <<'SQL'
BEGIN;
UPDATE public.orders SET status = 'shipped' WHERE id = 100;
INSERT INTO public.orders (id, customer_id, status, total) VALUES (102, 3, 'new', 42.00);
COMMIT;
DELETE FROM public.orders WHERE id = 101;
UPDATE public.customers SET id = 4 WHERE id = 2 AND NOT EXISTS (SELECT FROM public.orders WHERE customer_id = 2);
SQL
$PGCDC run "${common[@]}" --kafka "$PGCDC_TEST_KAFKA" --stop-lsn now

echo "== 3. the whole history again, as JSON lines on stdout (a fresh slot, so snapshot + nothing new)"
$PGCDC run --source "$source" --slot demo_stdout --publication demo --topic-prefix "$prefix" \
    --sink stdout --progress-file "$PGCDC_TEST_STATE/demo_stdout.json" --snapshot-only
echo "== done: topics $prefix.public.customers and $prefix.public.orders hold the events"
