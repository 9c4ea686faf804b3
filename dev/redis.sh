#!/usr/bin/env bash
# dev/redis.sh: a throwaway Redis for dev and tests (Debian's redis-server).
#
#   dev/redis.sh start    install redis-server if missing, start it, wait until PING answers
#   dev/redis.sh stop     SHUTDOWN NOSAVE (then SIGTERM / SIGKILL if needed)
#   dev/redis.sh status   exit 0 when running, 3 when not
#   dev/redis.sh env      print `export BILTEN_TEST_REDIS_URL=...`
#
# Settings (environment):
#   BILTEN_REDIS_PORT   port on 127.0.0.1 (default 56379)
#   BILTEN_REDIS_DIR    dir for its data, log and pid file (default /tmp/bilten-redis)
#   BILTEN_REDIS_ARGS   extra redis-server arguments, e.g. "--save 60 1000"
# No persistence by default (throwaway): no RDB snapshots, no AOF.
set -euo pipefail

PORT="${BILTEN_REDIS_PORT:-56379}"
RDIR="${BILTEN_REDIS_DIR:-/tmp/bilten-redis}"
HOST=127.0.0.1
PIDFILE="$RDIR/redis.pid"
LOGFILE="$RDIR/redis.log"
START_TIMEOUT="${BILTEN_REDIS_START_TIMEOUT:-30}"

log() { printf 'redis.sh: %s\n' "$*" >&2; }
die() { printf 'redis.sh: ERROR: %s\n' "$*" >&2; exit 1; }

ensure_installed() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || die "redis-server is missing and there is no apt-get"
  local sudo=""
  if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "redis-server is missing; install it as root: apt-get install redis-server"
    sudo="sudo"
  fi
  log "installing Debian's redis-server (apt-get update + install, ~10 s)"
  mkdir -p "$RDIR"
  # The package's own system service is not wanted: this script runs its own instance.
  # (Where /usr/sbin/policy-rc.d says no, as on these machines, apt starts none.)
  if ! { $sudo apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
              -o DPkg::Lock::Timeout=120 --no-install-recommends redis-server redis-tools
       } >"$RDIR/apt.log" 2>&1; then
    tail -n 30 "$RDIR/apt.log" >&2
    die "apt-get could not install redis-server (log above)"
  fi
  command -v redis-server >/dev/null 2>&1 || die "redis-server still missing after apt-get install"
}

redis_ping() { redis-cli -h "$HOST" -p "$PORT" ping 2>/dev/null | grep -q PONG; }

# True while any thread of the process is alive (a zombie is dead; PID 1 may reap late).
proc_alive() {
  local stat line state
  for stat in /proc/"$1"/task/*/stat; do
    line="$(cat "$stat" 2>/dev/null)" || continue
    [[ -n "$line" ]] || continue
    state="${line##*) }"
    state="${state%% *}"
    [[ "$state" != Z && "$state" != X ]] && return 0
  done
  return 1
}

running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && proc_alive "$pid" || return 1
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *redis-server*":$PORT"* ]] || return 1
  echo "$pid"
}

cmd_start() {
  local pid
  if pid="$(running_pid)" && redis_ping; then
    log "already running (pid $pid) on $HOST:$PORT"
    return 0
  fi
  ensure_installed
  if redis_ping || (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
    die "$HOST:$PORT is already in use by another process (set BILTEN_REDIS_PORT)"
  fi
  mkdir -p "$RDIR"
  rm -f "$PIDFILE"
  # shellcheck disable=SC2086  # word splitting of the extra arguments is intended
  redis-server --bind "$HOST" --port "$PORT" --dir "$RDIR" \
    --daemonize yes --pidfile "$PIDFILE" --logfile "$LOGFILE" \
    --save "" --appendonly no --protected-mode yes \
    ${BILTEN_REDIS_ARGS:-} </dev/null
  local deadline=$((SECONDS + START_TIMEOUT))
  until redis_ping; do
    if ((SECONDS >= deadline)); then
      tail -n 30 "$LOGFILE" >&2 || true
      die "redis on $HOST:$PORT did not answer PING within ${START_TIMEOUT}s (log above)"
    fi
    sleep 0.1
  done
  log "ready on $HOST:$PORT (pid $(cat "$PIDFILE" 2>/dev/null || echo ?), dir $RDIR)"
  echo "redis://$HOST:$PORT/0"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  redis-cli -h "$HOST" -p "$PORT" shutdown nosave >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while proc_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if proc_alive "$pid"; then
    log "pid $pid still alive: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && redis_ping; then
    echo "running pid=$pid url=redis://$HOST:$PORT/0 dir=$RDIR"
    return 0
  fi
  echo "stopped url=redis://$HOST:$PORT/0 dir=$RDIR"
  return 3
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  env) echo "export BILTEN_TEST_REDIS_URL=redis://$HOST:$PORT/0" ;;
  *) echo "usage: $0 start|stop|status|restart|env" >&2; exit 2 ;;
esac
