#!/usr/bin/env bash
# Throwaway PostgreSQL for development and CI: ./dev/postgres.sh start|stop|status|dsn
#
#   BILTEN_PG_DIR   cluster directory           (default /tmp/bilten-pg)
#   BILTEN_PG_PORT  port on 127.0.0.1           (default 55432)
#   BILTEN_PG_DB    database created at start   (default bilten_test)
#
# `start` installs Debian's postgresql package when no server binaries are found (needs
# root), initialises a cluster owned by the `postgres` user (the server refuses to run as
# root), starts it on 127.0.0.1 only with trust authentication (throwaway data, loopback
# only), creates the database and returns once it accepts connections. It prints the DSN,
# ready for: export BILTEN_TEST_POSTGRES_DSN="$(./dev/postgres.sh dsn)"
set -euo pipefail

PG_DIR="${BILTEN_PG_DIR:-/tmp/bilten-pg}"
PG_PORT="${BILTEN_PG_PORT:-55432}"
PG_DB="${BILTEN_PG_DB:-bilten_test}"
PG_USER=postgres
DATA="$PG_DIR/data"
LOG="$PG_DIR/server.log"

find_bindir() {
  local dir
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/pg_ctl" ]; then
    pg_config --bindir
    return 0
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/pg_ctl" ] && [ -x "$dir/initdb" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

ensure_installed() {
  if find_bindir >/dev/null; then
    return 0
  fi
  echo "postgres.sh: installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q postgresql >&2
  # The package starts the distribution's own cluster; ours is separate, leave it alone.
  find_bindir >/dev/null || { echo "postgres.sh: no server binaries after install" >&2; exit 1; }
}

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    # runuser keeps this non-interactive and needs no sudo package.
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

dsn() {
  echo "postgresql://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
}

start() {
  ensure_installed
  local bin
  bin="$(find_bindir)"
  if [ "$(id -u)" -eq 0 ]; then
    id "$PG_USER" >/dev/null 2>&1 || useradd --system --home-dir "$PG_DIR" --shell /usr/sbin/nologin "$PG_USER"
    mkdir -p "$PG_DIR"
    chown "$PG_USER" "$PG_DIR"
  else
    mkdir -p "$PG_DIR"
  fi
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$DATA" -U "$PG_USER" --auth=trust --encoding=UTF8 --no-locale >/dev/null
    cat >>"$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  fi
  if ! as_pg "$bin/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null
  fi
  local i
  for i in $(seq 1 60); do
    if as_pg "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
      break
    fi
    sleep 0.5
  done
  as_pg "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || { echo "postgres.sh: server not ready, see $LOG" >&2; exit 1; }
  if ! as_pg "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DB"
  fi
  dsn
}

stop() {
  local bin
  bin="$(find_bindir)" || exit 0
  if [ -f "$DATA/PG_VERSION" ]; then
    as_pg "$bin/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

status() {
  local bin
  bin="$(find_bindir)" || { echo "not installed"; exit 1; }
  as_pg "$bin/pg_isready" -h 127.0.0.1 -p "$PG_PORT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  dsn) dsn ;;
  *) echo "usage: $0 start|stop|status|dsn" >&2; exit 2 ;;
esac
