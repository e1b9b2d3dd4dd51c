#!/usr/bin/env bash
# The docker-compose pipeline, without Docker, on this machine:
#
#   PostgreSQL (private cluster from scripts/test-env.sh, seeded from sql/demo.sql)
#     → pgcdc run (snapshot, then streaming)
#     → Kafka (the tansu broker from scripts/test-env.sh)
#     → pgcdc-indexer --target stdout (what it would write to Meilisearch, as JSON documents)
#
# It shows the snapshot's documents, then an UPDATE, INSERT, DELETE and primary-key change
# applied live, then read-your-writes (an UPDATE, its WAL position, the indexer's /wait on it,
# and the document, there without polling), then the final documents, and stops by itself
# (well under a minute after the build). Settings for tests and CI:
#   PGCDC_DEMO_BIN_DIR  directory holding already built pgcdc and pgcdc-indexer (skips the build)
#   PGCDC_DEMO_DB       database, slot and publication name (default pgcdc_demo)
#   PGCDC_DEMO_TIMEOUT  seconds to wait for each step (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

eval "$(bash scripts/test-env.sh)"
if [ -n "${PGCDC_DEMO_BIN_DIR:-}" ]; then
    bin=$PGCDC_DEMO_BIN_DIR
else
    echo "building pgcdc and pgcdc-indexer (release; the first build takes a few minutes)" >&2
    cargo build --quiet --release --locked --bins
    bin=${CARGO_TARGET_DIR:-target}/release
fi
for b in pgcdc pgcdc-indexer; do
    [ -x "$bin/$b" ] || { echo "error: $bin/$b is missing" >&2; exit 1; }
done

db=${PGCDC_DEMO_DB:-pgcdc_demo}
timeout_s=${PGCDC_DEMO_TIMEOUT:-30}
case $db in *[!a-z0-9_]*) echo "error: PGCDC_DEMO_DB must be lower-case letters, digits and _" >&2; exit 2;; esac
export PGOPTIONS="-c client_min_messages=warning"
PSQL=("$PGCDC_TEST_PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGCDC_TEST_PGHOST" -p "$PGCDC_TEST_PGPORT" -U "$PGCDC_TEST_PGUSER")
work=$(mktemp -d)
pids=()

# Drops the demo's slot, so it does not keep WAL after the demo (waits for its walsender to end).
drop_slot() {
    local left
    for _ in $(seq 1 50); do
        "${PSQL[@]}" -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$db' AND NOT active" >/dev/null 2>&1 || true
        left=$("${PSQL[@]}" -d postgres -At -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$db'" 2>/dev/null) || left=1
        [ "$left" = 0 ] && return 0
        sleep 0.1
    done
}
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    drop_slot
    rm -rf "$work"
}
trap cleanup EXIT

# Prints the indexer's JSON lines from line $1 on as `action index/id {row} @version`.
show() {
    tail -n "+$1" "$work/docs.jsonl" | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    doc = e.get("doc") or {}
    ident = doc.get("_id", e.get("_id"))
    version = doc.get("_version", e.get("_version"))
    row = {k: v for k, v in doc.items() if not k.startswith("_")}
    text = json.dumps(row, sort_keys=True) if doc else "(deleted)"
    action, index = e["action"], e["index"]
    name = f"{index}/{ident}"
    print(f"  {action:<8} {name:<13} {text}  @{version}")
'
}
lines() { wc -l <"$work/docs.jsonl"; }

# Waits until the indexer printed at least $1 lines; on timeout shows the logs and fails.
wait_lines() {
    local deadline=$((SECONDS + timeout_s))
    while [ "$(lines)" -lt "$1" ]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "error: timed out waiting for $1 indexer lines (have $(lines))" >&2
            tail -n 40 "$work/pgcdc.log" "$work/indexer.log" >&2
            exit 1
        fi
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null || { echo "error: a demo process died" >&2; tail -n 40 "$work/pgcdc.log" "$work/indexer.log" >&2; exit 1; }
        done
        sleep 0.05
    done
}
ms() { date +%s%3N; }

# The address a process logged after "$2" in log $1 (waits for it).
logged_addr() {
    local deadline=$((SECONDS + timeout_s)) addr
    while :; do
        addr=$(sed -n "s|.*$2\([0-9.:]*\)/.*|\1|p" "$1" | head -n 1)
        [ -n "$addr" ] && { echo "$addr"; return 0; }
        [ $SECONDS -ge $deadline ] && { echo "error: no address in $1" >&2; tail -n 40 "$1" >&2; exit 1; }
        sleep 0.05
    done
}

# GET of a URL (no proxy); prints the body whatever the status.
http_get() {
    python3 - "$1" <<'PY'
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    print(opener.open(sys.argv[1], timeout=330).read().decode())
except urllib.error.HTTPError as e:
    print(e.read().decode())
PY
}

step "0. a fresh database '$db' on $PGCDC_TEST_PGHOST:$PGCDC_TEST_PGPORT, seeded from sql/demo.sql"
"${PSQL[@]}" -d postgres -c "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '$db' AND active_pid IS NOT NULL" >/dev/null
drop_slot
"${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
"${PSQL[@]}" -d "$db" -f sql/demo.sql >/dev/null
"${PSQL[@]}" -d "$db" -c "SELECT 'customers' AS \"table\", count(*) FROM customers UNION ALL SELECT 'orders', count(*) FROM orders"

# Fresh topics on every run, so the output shows this run only.
prefix="${db}_$(date +%s)_$$"
source="host=$PGCDC_TEST_PGHOST port=$PGCDC_TEST_PGPORT user=$PGCDC_TEST_PGUSER dbname=$db sslmode=disable"
topics=("$prefix.public.customers" "$prefix.public.orders")
: >"$work/docs.jsonl"

step "1. pgcdc: snapshot, then streaming, to Kafka at $PGCDC_TEST_KAFKA (topics $prefix.public.*)"
PGCDC_LOG=${PGCDC_LOG:-info} "$bin/pgcdc" run --source "$source" --kafka "$PGCDC_TEST_KAFKA" \
    --slot "$db" --publication "$db" --topic-prefix "$prefix" \
    --table public.customers --table public.orders --status-interval 0.5 \
    --metrics-addr 127.0.0.1:0 </dev/null 2>"$work/pgcdc.log" &
pids+=($!)
pgcdc_addr=$(logged_addr "$work/pgcdc.log" "serving metrics on http://")
"$bin/pgcdc-indexer" --kafka "$PGCDC_TEST_KAFKA" --topic "${topics[0]}" --topic "${topics[1]}" \
    --target stdout --http-addr 127.0.0.1:0 --pgcdc-url "http://$pgcdc_addr" \
    </dev/null >"$work/docs.jsonl" 2>"$work/indexer.log" &
pids+=($!)
wait_lines 5
echo "the indexer's documents (what Meilisearch would hold):"
show 1
seen=$(lines)

step "2. live changes, committed in PostgreSQL"
sql="UPDATE orders SET status = 'shipped' WHERE id = 100;
INSERT INTO orders (id, customer_id, status, total, details) VALUES (102, 3, 'new', 42.00, '{\"items\": 3}');
DELETE FROM orders WHERE id = 101;
UPDATE customers SET id = 4 WHERE id = 2;  -- a primary-key change"
printf '%s\n' "$sql" | sed 's/^/  /'
start=$(ms)
"${PSQL[@]}" -d "$db" -c "$sql" >/dev/null
# update, insert, delete, and the key change as delete + insert: 5 writes.
wait_lines $((seen + 5))
echo "applied by the indexer $(( $(ms) - start )) ms after the commit returned:"
show $((seen + 1))

seen=$(lines)

step "3. read-your-writes: an UPDATE, its WAL position, a wait on the index, then the document"
ix_addr=$(logged_addr "$work/indexer.log" "serving read-your-writes on http://")
sql="UPDATE customers SET name = 'Grace Brewster Hopper' WHERE id = 4;"
echo "  $sql"
echo "  SELECT pg_current_wal_insert_lsn();"
start=$(ms)
lsn=$("${PSQL[@]}" -d "$db" -At -c "$sql" -c "SELECT pg_current_wal_insert_lsn()")
answer=$(http_get "http://$ix_addr/wait?lsn=$lsn&timeout=${timeout_s}s")
waited=$(( $(ms) - start ))
echo "  GET http://$ix_addr/wait?lsn=$lsn → $answer"
case $answer in *'"reached":true'*) ;; *) echo "error: the wait failed: $answer" >&2; tail -n 40 "$work/pgcdc.log" "$work/indexer.log" >&2; exit 1;; esac
echo "the index has it $waited ms after the commit returned (no polling: the document is there now):"
show $((seen + 1))
seen=$(lines)

step "4. stop (SIGTERM): the indexer prints its final documents"
kill -TERM "${pids[1]}"
wait "${pids[1]}"
kill -TERM "${pids[0]}"
wait "${pids[0]}"
pids=()
show "$((seen + 1))"

step "5. check: the final documents equal a fresh snapshot of the tables"
"$bin/pgcdc" run --source "$source" --sink stdout --snapshot-only --slot "${db}_check" \
    --publication "$db" --topic-prefix "$prefix" --progress-file "$work/check.json" \
    </dev/null >"$work/snapshot.jsonl" 2>>"$work/pgcdc.log"
python3 - "$work/docs.jsonl" "$work/snapshot.jsonl" <<'PY'
import json, sys
docs = {}
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["action"] == "document":
        row = {k: v for k, v in e["doc"].items() if not k.startswith("_")}
        docs[(e["index"], e["doc"]["_id"])] = row
table = {}
for line in open(sys.argv[2]):
    e = json.loads(line)
    if e["value"]["op"] == "s":
        continue  # a snapshot marker: the end of a table's snapshot, no row
    after = e["value"]["after"]
    table[(e["topic"].rsplit(".", 1)[-1], str(after["id"]))] = after
if docs != table:
    print("  MISMATCH", file=sys.stderr)
    for k in sorted(set(docs) | set(table)):
        if docs.get(k) != table.get(k):
            print(f"  {k}: index {docs.get(k)} table {table.get(k)}", file=sys.stderr)
    sys.exit(1)
print(f"  the index holds exactly the {len(table)} rows of the tables")
PY
echo
echo "== done: topics $prefix.public.{customers,orders} keep the events"
