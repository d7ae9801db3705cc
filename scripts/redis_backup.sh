#!/usr/bin/env bash
# Back up Imagine's Redis and restore it into a fresh server (docs/operations.md, "Backup and
# restore"). Needs redis-cli and redis-server (the redis image has both). A password goes in
# REDISCLI_AUTH (e.g. REDISCLI_AUTH="$(cat secrets/redis_password)"), never on the command line.
#
#   scripts/redis_backup.sh backup  REDIS_URL BACKUP.rdb
#       A consistent snapshot of the running server, fetched over the network (redis-cli --rdb:
#       the server forks and streams an RDB; queues keep working meanwhile).
#   scripts/redis_backup.sh restore BACKUP.rdb DATA_DIR
#       Fill DATA_DIR (the data directory of a STOPPED or new server, e.g. the redis-data volume)
#       from the backup, AOF included: a server started on DATA_DIR with --appendonly yes (as
#       compose runs it) then loads exactly the backed-up data. A server with AOF on ignores a
#       bare dump.rdb and would start empty, so this loads the RDB into a temporary server with
#       AOF off, turns AOF on (rewriting it from the data) and shuts that server down.
set -euo pipefail

die() { echo "redis_backup: $*" >&2; exit 1; }

case "${1:-}" in
backup)
    [ $# -eq 3 ] || die "usage: $0 backup REDIS_URL BACKUP.rdb"
    redis-cli -u "$2" --no-auth-warning --rdb "$3.partial" >/dev/null
    mv "$3.partial" "$3"
    echo "backup: $(wc -c < "$3") bytes written to $3"
    ;;
restore)
    [ $# -eq 3 ] || die "usage: $0 restore BACKUP.rdb DATA_DIR"
    backup=$(realpath "$2"); data=$3
    [ -s "$backup" ] || die "$backup is missing or empty"
    mkdir -p "$data"
    if [ -n "$(ls -A "$data" 2>/dev/null)" ]; then
        die "$data is not empty: restore into the data directory of a new server (or move the old data away first)"
    fi
    cp "$backup" "$data/dump.rdb"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --dir "$data" --dbfilename dump.rdb \
        --appendonly no --save "" --daemonize no >"$data/restore.log" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null || true' EXIT
    cli() { REDISCLI_AUTH= redis-cli -p "$port" "$@"; }
    for _ in $(seq 100); do
        [ "$(cli ping 2>/dev/null)" = PONG ] && [ "$(cli info persistence | tr -d '\r' | sed -n 's/^loading://p')" = 0 ] && break
        sleep 0.1
    done
    keys=$(cli dbsize)
    cli config set appendonly yes >/dev/null
    for _ in $(seq 600); do
        state=$(cli info persistence | tr -d '\r')
        grep -q '^aof_rewrite_in_progress:0' <<<"$state" && grep -q '^aof_rewrite_scheduled:0' <<<"$state" \
            && grep -q '^aof_enabled:1' <<<"$state" && break
        sleep 0.1
    done
    cli shutdown save >/dev/null 2>&1 || true
    wait "$server" 2>/dev/null || true
    trap - EXIT
    rm -f "$data/restore.log"
    echo "restore: $keys keys from $backup into $data (RDB and AOF); start the server on it with --appendonly yes"
    ;;
*)
    die "usage: $0 backup REDIS_URL BACKUP.rdb | restore BACKUP.rdb DATA_DIR"
    ;;
esac
