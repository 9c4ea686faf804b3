#!/usr/bin/env bash
# dev/kafka.sh: a real single-node Apache Kafka (KRaft, broker + controller in one JVM)
# for dev and tests, run from the Maven Central jars; no download from anywhere else.
#
#   dev/kafka.sh start    fetch the jars if not cached, format storage once, start, wait ready
#   dev/kafka.sh stop     SIGTERM, wait, SIGKILL if needed; the data stays for the next start
#   dev/kafka.sh status   exit 0 and print pid + bootstrap when running, exit 3 when not
#   dev/kafka.sh restart  stop then start
#   dev/kafka.sh fetch    only fetch the jars into the cache
#   dev/kafka.sh env      print `export BILTEN_TEST_KAFKA_BOOTSTRAP=...`
#   dev/kafka.sh logs     tail the broker log
#
# Settings (environment):
#   BILTEN_KAFKA_VERSION        Kafka version to run (default 4.4.0)
#   BILTEN_CACHE_DIR            jar cache root (default ~/.cache/bilten); jars go to
#                               $BILTEN_CACHE_DIR/kafka-<version>/libs
#   BILTEN_KAFKA_DIR            data dir: storage, logs, pid file (default /tmp/bilten-kafka)
#   BILTEN_KAFKA_HOST           listen/advertise address (default 127.0.0.1)
#   BILTEN_KAFKA_PORT           client (PLAINTEXT) port (default 9092)
#   BILTEN_KAFKA_CONTROLLER_PORT  KRaft controller port (default 9093)
#   BILTEN_KAFKA_HEAP           JVM heap, -Xms and -Xmx (default 1g)
#   BILTEN_KAFKA_JVM_OPTS       extra JVM options
#   BILTEN_KAFKA_START_TIMEOUT  seconds to wait for readiness (default 120)
#   BILTEN_KAFKA_STOP_TIMEOUT   seconds to wait after SIGTERM before SIGKILL (default 60)
#   BILTEN_PYTHON               Python with confluent-kafka for the readiness probe
#                               (default: the repo's .venv/bin/python, else python3)
#   MVN                         Maven command (default mvn)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
TEMPLATE_DIR="$SCRIPT_DIR/kafka"

KAFKA_VERSION="${BILTEN_KAFKA_VERSION:-4.4.0}"
CACHE_ROOT="${BILTEN_CACHE_DIR:-$HOME/.cache/bilten}"
KAFKA_HOME="$CACHE_ROOT/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
KDIR="${BILTEN_KAFKA_DIR:-/tmp/bilten-kafka}"
HOST="${BILTEN_KAFKA_HOST:-127.0.0.1}"
PORT="${BILTEN_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${BILTEN_KAFKA_CONTROLLER_PORT:-9093}"
HEAP="${BILTEN_KAFKA_HEAP:-1g}"
START_TIMEOUT="${BILTEN_KAFKA_START_TIMEOUT:-120}"
STOP_TIMEOUT="${BILTEN_KAFKA_STOP_TIMEOUT:-60}"
MVN="${MVN:-mvn}"
DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

DATA="$KDIR/data"
LOGS="$KDIR/logs"
PROPS="$KDIR/server.properties"
PIDFILE="$KDIR/kafka.pid"
OUT="$KDIR/kafka.out"
BOOTSTRAP="$HOST:$PORT"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { printf 'kafka.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites

find_java() {
  local java=""
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    java="$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    java="$(command -v java)"
  fi
  if [[ -z "$java" ]]; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      log "no java found: installing Debian's openjdk-17-jre-headless"
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 \
        --no-install-recommends openjdk-17-jre-headless >&2
      java="$(command -v java)" || die "java still missing after apt-get install"
    else
      die "no java: Kafka $KAFKA_VERSION needs Java 17+ (set JAVA_HOME or put java on PATH)"
    fi
  fi
  local major
  major="$("$java" -XshowSettings:properties -version 2>&1 \
    | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p' | head -n1)"
  if [[ -z "$major" || "$major" -lt 17 ]]; then
    die "$java is Java ${major:-?}; Kafka $KAFKA_VERSION needs Java 17+"
  fi
  JAVA="$java"
}

find_mvn() {
  if command -v "$MVN" >/dev/null 2>&1; then return 0; fi
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "no Maven found: installing Debian's maven"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 \
      --no-install-recommends maven >&2
    command -v "$MVN" >/dev/null 2>&1 || die "mvn still missing after apt-get install"
  else
    die "Kafka jars are not cached in $LIBS and Maven ($MVN) is not installed"
  fi
}

# ---------------------------------------------------------------- jars

jars_cached() { [[ -f "$KAFKA_HOME/.complete" && -d "$LIBS" ]]; }

fetch_jars() {
  jars_cached && return 0
  mkdir -p "$CACHE_ROOT"
  # One fetch at a time per version (CI jobs or two shells starting at once).
  exec 8>"$CACHE_ROOT/.kafka-$KAFKA_VERSION.lock"
  flock 8
  if jars_cached; then exec 8>&-; return 0; fi
  find_mvn
  local tmp="$KAFKA_HOME.tmp.$$" t0=$SECONDS
  rm -rf "$tmp"
  mkdir -p "$tmp"
  log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies from Maven Central (cold: 20-60 s)"
  if ! "$MVN" -B -q -f "$TEMPLATE_DIR/pom.xml" \
        -Dkafka.version="$KAFKA_VERSION" \
        "$DEPENDENCY_PLUGIN:copy-dependencies" \
        -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
    tail -n 40 "$tmp/mvn.log" >&2
    rm -rf "$tmp"
    die "Maven could not fetch the Kafka $KAFKA_VERSION jars (log above)"
  fi
  [[ -f "$tmp/libs/kafka_2.13-$KAFKA_VERSION.jar" ]] \
    || { rm -rf "$tmp"; die "Maven ran but kafka_2.13-$KAFKA_VERSION.jar is missing"; }
  rm -f "$tmp/mvn.log"
  echo "$KAFKA_VERSION" >"$tmp/.complete"
  rm -rf "$KAFKA_HOME"
  mv "$tmp" "$KAFKA_HOME"
  log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1)) into $LIBS in $((SECONDS - t0)) s"
  exec 8>&-
}

# ---------------------------------------------------------------- process

# True while any thread of the process is alive. A zombie is dead, but a killed JVM's
# group leader can be a zombie while its other threads (holding the sockets) still exit;
# and PID 1 here may be slow to reap, so `kill -0` alone would wait on a zombie forever.
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

# The pid in the pid file, if that process is alive and is our broker (not a reused pid).
running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  proc_alive "$pid" || return 1
  local cmdline
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmdline" == *kafka.Kafka* && "$cmdline" == *"$PROPS"* ]] || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

log_tail() {
  if [[ -s "$OUT" ]]; then
    printf -- '----- last 20 lines of %s -----\n' "$OUT" >&2
    tail -n 20 "$OUT" >&2
  fi
  if [[ -s "$LOGS/server.log" ]]; then
    # without the multi-line config dumps (lines starting with a tab)
    printf -- '----- last 40 log lines of %s (config dumps left out) -----\n' "$LOGS/server.log" >&2
    grep -v $'^\t' "$LOGS/server.log" | tail -n 40 >&2
  fi
}

find_python() {
  local cand
  for cand in "${BILTEN_PYTHON:-}" "$REPO_DIR/.venv/bin/python" python3; do
    [[ -n "$cand" ]] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import confluent_kafka' 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

# One readiness probe: a Metadata request answered with our broker in it.
probe_metadata() {
  "$1" - "$BOOTSTRAP" <<'PY' 2>/dev/null
import sys
from confluent_kafka.admin import AdminClient

admin = AdminClient({"bootstrap.servers": sys.argv[1], "socket.timeout.ms": 3000, "log_level": 0})
md = admin.list_topics(timeout=3)
sys.exit(0 if md.brokers else 1)
PY
}

wait_ready() {
  local pid="$1" deadline=$((SECONDS + START_TIMEOUT)) python=""
  python="$(find_python || true)"
  [[ -n "$python" ]] || log "no Python with confluent-kafka: readiness = port open + 'Kafka Server started' in the log"
  while ((SECONDS < deadline)); do
    if ! proc_alive "$pid"; then
      log_tail
      rm -f "$PIDFILE"
      die "broker (pid $pid) exited during startup; logs in $KDIR"
    fi
    if port_open "$HOST" "$PORT"; then
      if [[ -n "$python" ]]; then
        probe_metadata "$python" && return 0
      elif grep -q 'Kafka Server started' "$LOGS/server.log" 2>/dev/null; then
        return 0
      fi
    fi
    sleep 0.5
  done
  log_tail
  die "broker (pid $pid) not ready on $BOOTSTRAP after ${START_TIMEOUT}s; still running, logs in $KDIR (dev/kafka.sh stop to end it)"
}

render_config() {
  sed -e "s#@HOST@#$HOST#g" -e "s#@PORT@#$PORT#g" \
      -e "s#@CONTROLLER_PORT@#$CONTROLLER_PORT#g" -e "s#@DATA_DIR@#$DATA#g" \
      "$TEMPLATE_DIR/server.properties.in" >"$PROPS.tmp"
  mv "$PROPS.tmp" "$PROPS"
}

# JVM flags of the broker (as Kafka's own kafka-run-class.sh, heap from BILTEN_KAFKA_HEAP).
jvm_args() {
  JVM_ARGS=(-Xms"$HEAP" -Xmx"$HEAP" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Xlog:gc*:file=$LOGS/gc.log:time,tags:filecount=5,filesize=20M"
    -Dlog4j2.configurationFile="$TEMPLATE_DIR/log4j2.xml" -Dkafka.logs.dir="$LOGS")
  # shellcheck disable=SC2206  # word splitting of the extra options is intended
  [[ -n "${BILTEN_KAFKA_JVM_OPTS:-}" ]] && JVM_ARGS+=(${BILTEN_KAFKA_JVM_OPTS})
  return 0
}

format_storage() {
  [[ -f "$DATA/meta.properties" ]] && return 0
  local cluster_id
  if [[ -s "$KDIR/cluster.id" ]]; then
    cluster_id="$(cat "$KDIR/cluster.id")"
  else
    cluster_id="$("$JAVA" -Dlog4j2.configurationFile="$TEMPLATE_DIR/log4j2-tools.xml" \
      -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)"
    [[ "$cluster_id" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "could not generate a cluster id ($cluster_id)"
    echo "$cluster_id" >"$KDIR/cluster.id"
  fi
  log "formatting $DATA (cluster id $cluster_id)"
  mkdir -p "$DATA"
  "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$TEMPLATE_DIR/log4j2-tools.xml" \
    -cp "$LIBS/*" kafka.tools.StorageTool format --config "$PROPS" --cluster-id "$cluster_id" \
    --ignore-formatted >>"$LOGS/format.log" 2>&1 \
    || { tail -n 30 "$LOGS/format.log" >&2; die "kafka-storage format failed"; }
}

lock_dir() {
  mkdir -p "$KDIR"
  exec 9>"$KDIR/.lock"
  flock 9
}

cmd_start() {
  local t0=$SECONDS pid
  lock_dir
  if pid="$(running_pid)"; then
    if ! grep -q "^listeners=PLAINTEXT://$HOST:$PORT," "$PROPS" 2>/dev/null; then
      die "a broker (pid $pid) already runs from $KDIR with other listeners ($(grep '^listeners=' "$PROPS")): dev/kafka.sh stop first"
    fi
    log "already running (pid $pid) on $BOOTSTRAP"
    wait_ready "$pid"
    echo "$BOOTSTRAP"
    return 0
  fi
  rm -f "$PIDFILE"
  # A broker that was just killed may hold its ports for a moment: wait up to 15 s.
  local p deadline=$((SECONDS + 15))
  for p in "$PORT" "$CONTROLLER_PORT"; do
    while port_open "$HOST" "$p"; do
      if ((SECONDS >= deadline)); then
        die "$HOST:$p is already in use by another process (set BILTEN_KAFKA_PORT / BILTEN_KAFKA_CONTROLLER_PORT)"
      fi
      sleep 0.5
    done
  done
  find_java
  fetch_jars
  mkdir -p "$DATA" "$LOGS"
  render_config
  format_storage
  log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (controller $HOST:$CONTROLLER_PORT, heap $HEAP, data $KDIR)"
  : >"$OUT"
  # Keep the previous run's log apart, so a failure's log tail is this run's.
  if [[ -s "$LOGS/server.log" ]]; then mv -f "$LOGS/server.log" "$LOGS/server.log.previous-run"; fi
  # setsid: the broker outlives this shell and its process group.
  jvm_args
  # shellcheck disable=SC2016  # $$ and $@ expand in the child shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$PIDFILE" \
    "$JAVA" "${JVM_ARGS[@]}" -cp "$LIBS/*" kafka.Kafka "$PROPS" \
    </dev/null >>"$OUT" 2>&1 8>&- 9>&- &
  local _
  for _ in $(seq 50); do [[ -s "$PIDFILE" ]] && break; sleep 0.1; done
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [[ -n "$pid" ]] || die "could not start java (see $OUT)"
  wait_ready "$pid"
  log "ready on $BOOTSTRAP (pid $pid) in $((SECONDS - t0)) s"
  echo "$BOOTSTRAP"
}

cmd_stop() {
  local pid
  lock_dir
  if ! pid="$(running_pid)"; then
    rm -f "$PIDFILE"
    log "not running"
    return 0
  fi
  log "stopping pid $pid (SIGTERM, up to ${STOP_TIMEOUT}s)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while proc_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if proc_alive "$pid"; then
    log "pid $pid still alive after ${STOP_TIMEOUT}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while proc_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    proc_alive "$pid" && die "pid $pid survived SIGKILL for 30 s"
  fi
  rm -f "$PIDFILE"
  log "stopped (data kept in $DATA)"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    echo "running pid=$pid bootstrap=$BOOTSTRAP version=$KAFKA_VERSION dir=$KDIR"
    return 0
  fi
  echo "stopped bootstrap=$BOOTSTRAP dir=$KDIR"
  return 3
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  fetch) find_java; fetch_jars; echo "$LIBS" ;;
  env) echo "export BILTEN_TEST_KAFKA_BOOTSTRAP=$BOOTSTRAP" ;;
  logs) tail -n "${2:-100}" "$LOGS/server.log" ;;
  *) echo "usage: $0 start|stop|status|restart|fetch|env|logs [N]" >&2; exit 2 ;;
esac
