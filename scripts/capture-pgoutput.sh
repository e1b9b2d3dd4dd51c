#!/usr/bin/env bash
# Capture real pgoutput messages from a PostgreSQL server (14+, wal_level=logical) into
# tests/fixtures/pgoutput/, one message per line: `<lsn> <hex bytes>`.
#
# Usage: PGHOST=... PGPORT=... PGUSER=... scripts/capture-pgoutput.sh [OUTPUT_DIR]
#
# The user must be a superuser (it creates a replication origin and a slot). The script
# works in its own database `pgcdc_capture` (dropped and recreated), and drops its slot,
# origin and database at the end so that no slot keeps WAL alive on a shared cluster
# (set KEEP=1 to keep them for inspection).
#
# Three fixture sets are written from the same slot with pg_logical_slot_peek_binary_changes
# (peeking never consumes, so each set sees the same WAL):
#   text.txt       proto_version 2, text tuples, messages on; the small workload only
#   binary.txt     the same with binary 'true'
#   streaming.txt  proto_version 2 with streaming 'on' and logical_decoding_work_mem=64kB in
#                  the decoding session: the small workload plus the large transactions,
#                  which the server streams (Stream Start/Stop/Commit/Abort)
set -euo pipefail

DB=pgcdc_capture
SLOT=cap
PUB=cap_pub
ORIGIN=cap_origin
OUT=${1:-"$(cd "$(dirname "$0")/.." && pwd)/tests/fixtures/pgoutput"}
mkdir -p "$OUT"
# The workload contains non-ASCII text; send it as UTF-8 whatever the local locale is.
export PGCLIENTENCODING=UTF8

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }

cleanup() {
    psql_admin <<SQL
SET client_min_messages = warning;
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$SLOT';
SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = '$ORIGIN';
DROP DATABASE IF EXISTS $DB;
SQL
}

cleanup >/dev/null
psql_admin -c "CREATE DATABASE $DB TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'" >/dev/null

# Schema. Covers every replica identity that can carry an old tuple, a user-defined type
# (so the server sends a Type message) and an out-of-line TOASTed column.
psql_db >/dev/null <<'SQL'
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
-- Primary key, REPLICA IDENTITY DEFAULT, nullable columns, a user-defined type.
CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL, balance numeric(12,2),
                       note text, feeling mood);
-- REPLICA IDENTITY FULL: updates and deletes carry the whole old row ('O').
CREATE TABLE audit (id bigint, event text, at timestamptz);
ALTER TABLE audit REPLICA IDENTITY FULL;
-- REPLICA IDENTITY DEFAULT with a large TOASTed column: an update that does not touch
-- `body` sends it as 'u' (unchanged TOAST). EXTERNAL storage keeps it out of line
-- (no compression back under the TOAST threshold).
CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
-- REPLICA IDENTITY USING INDEX: the key is a non-primary unique column.
CREATE TABLE tags (id int PRIMARY KEY, code text NOT NULL);
CREATE UNIQUE INDEX tags_code ON tags (code);
ALTER TABLE tags REPLICA IDENTITY USING INDEX tags_code;
-- Target of the large (streamed) transactions: small rows, so that the 64kB decoding
-- memory limit is crossed with few bytes on the wire.
CREATE TABLE big (id int PRIMARY KEY, n int);
CREATE PUBLICATION cap_pub FOR ALL TABLES;
SQL

psql_db -At -c "SELECT lsn FROM pg_create_logical_replication_slot('$SLOT', 'pgoutput')" >/dev/null

# The small workload: one transaction per statement unless marked otherwise.
psql_db >/dev/null <<SQL
BEGIN;
INSERT INTO accounts VALUES (1, 'alice', 10.50, NULL, 'happy'),
                            (2, 'bob', -3.25, 'héllo ✓', 'ok'),
                            (3, 'carol', 0, 'to be deleted', NULL);
INSERT INTO audit VALUES (1, 'created', '2024-01-02 03:04:05.123456+00'),
                         (2, 'to be deleted', '2024-01-02 03:04:05+00');
INSERT INTO docs VALUES (1, 'first title', repeat('0123456789', 250));
INSERT INTO tags VALUES (1, 'A'), (2, 'B');
COMMIT;
-- Only a non-key column changes: new tuple only.
UPDATE accounts SET balance = 20 WHERE id = 1;
-- The primary key changes: old key tuple ('K').
UPDATE accounts SET id = 20 WHERE id = 2;
-- REPLICA IDENTITY FULL: old full tuple ('O').
UPDATE audit SET event = 'changed' WHERE id = 1;
-- The TOASTed body is untouched: 'u' in the new tuple.
UPDATE docs SET title = 'second title' WHERE id = 1;
-- The replica identity index column changes: old key tuple with the index column only.
UPDATE tags SET code = 'C' WHERE id = 2;
DELETE FROM accounts WHERE id = 3;
DELETE FROM audit WHERE id = 2;
DELETE FROM tags WHERE id = 1;
-- A transactional logical message together with a change, then a non-transactional one.
BEGIN;
SELECT pg_logical_emit_message(true, 'p', 'hello');
INSERT INTO accounts VALUES (4, 'dave', NULL, NULL, 'sad');
COMMIT;
SELECT pg_logical_emit_message(false, 'p2', 'x');
-- Schema change: the next insert is preceded by a second Relation message for accounts.
ALTER TABLE accounts ADD COLUMN extra int DEFAULT 7;
INSERT INTO accounts VALUES (5, 'eve', 1.5, 'after alter', 'ok', 42);
-- A transaction replayed from a replication origin: Begin is followed by Origin.
SELECT pg_replication_origin_create('$ORIGIN');
SELECT pg_replication_origin_session_setup('$ORIGIN');
BEGIN;
SELECT pg_replication_origin_xact_setup('1/23456789', '2024-01-02 03:04:05+00');
INSERT INTO tags VALUES (3, 'from origin');
COMMIT;
SELECT pg_replication_origin_session_reset();
-- Two tables with both options: restart identity (2) and cascade (1).
TRUNCATE docs, audit RESTART IDENTITY CASCADE;
SQL

# Everything up to here goes into the text and binary sets.
SMALL_END=$(psql_db -At -c "SELECT pg_current_wal_lsn()")

# The large transactions, streamed only when the decoding session has a small memory limit.
psql_db >/dev/null <<'SQL'
-- Committed: Stream Start (first segment), Stop, Start (later segment), ..., Stream Commit.
BEGIN;
INSERT INTO big SELECT g, g FROM generate_series(1, 600) g;
-- In-stream Type, Relation, Insert and Message, all carrying the xid.
INSERT INTO accounts VALUES (6, 'streamed', NULL, NULL, 'happy', NULL);
SELECT pg_logical_emit_message(true, 'big', 'in stream');
COMMIT;
-- Rolled back after being streamed: Stream Abort with subxid = xid.
BEGIN;
INSERT INTO big SELECT g, g FROM generate_series(1001, 1600) g;
ROLLBACK;
-- A streamed subtransaction rolled back inside a committed transaction: Stream Abort
-- with subxid != xid, then Stream Commit.
BEGIN;
INSERT INTO big VALUES (0, 0);
SAVEPOINT s;
INSERT INTO big SELECT g, g FROM generate_series(3001, 3600) g;
ROLLBACK TO SAVEPOINT s;
UPDATE big SET n = -1 WHERE id = 0;
-- In-stream Delete and Truncate.
DELETE FROM big WHERE id = 1;
TRUNCATE big;
COMMIT;
SQL

VERSION=$(psql_db -At -c "SHOW server_version")

# peek FILE DESCRIPTION UPTO OPTIONS [SESSION_SETUP]
peek() {
    local file=$1 desc=$2 upto=$3 options=$4 setup=${5:-}
    {
        echo "# pgoutput messages captured by scripts/capture-pgoutput.sh from PostgreSQL $VERSION"
        echo "# $desc"
        echo "# options: $options"
        echo "# one message per line: <lsn of the WAL record> <message bytes in hex>"
        psql_db -At <<SQL
$setup
SELECT lsn || ' ' || encode(data, 'hex')
FROM pg_logical_slot_peek_binary_changes('$SLOT', $upto, NULL, $options);
SQL
    } >"$OUT/$file"
    echo "wrote $OUT/$file ($(grep -vc '^#' "$OUT/$file") messages)"
}

BASE="'proto_version', '2', 'publication_names', '$PUB', 'messages', 'true'"
peek text.txt "text tuples, small workload" "'$SMALL_END'" "$BASE"
peek binary.txt "binary tuples, small workload" "'$SMALL_END'" "$BASE, 'binary', 'true'"
peek streaming.txt "streaming on, logical_decoding_work_mem=64kB, whole workload" NULL \
    "$BASE, 'streaming', 'on'" "SET logical_decoding_work_mem = '64kB';"

if [[ "${KEEP:-0}" != 1 ]]; then
    cleanup >/dev/null
fi
