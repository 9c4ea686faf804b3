#!/usr/bin/env bash
# dev/pinot.sh: a real single-node Apache Pinot cluster for dev and tests, run from the jars
# Maven Central serves (no download from anywhere else, no Docker):
#   - ZooKeeper 3.5.8 (org.apache.zookeeper.server.ZooKeeperServerMain), its own small JVM
#   - Pinot 0.11.0 controller + broker + server in ONE JVM (PinotAdministrator StartServiceManager)
# Why 0.11.0 and what the two small shims in dev/pinot/shim are: docs/pinot-on-this-machine.md.
#
#   dev/pinot.sh start    fetch the jars if not cached, start ZK + Pinot, wait for the controller,
#                         broker and server /health to answer OK (log tail + exit 1 on failure)
#   dev/pinot.sh stop     SIGTERM Pinot then ZK (SIGKILL after a timeout); data stays
#   dev/pinot.sh status   exit 0 and print pids + URLs + RSS when running and healthy; exit 1 when a
#                         process runs but /health fails (starting or broken); exit 3 when stopped
#   dev/pinot.sh restart  stop then start
#   dev/pinot.sh fetch    only fetch the jars (and build the shim jar) into the cache
#   dev/pinot.sh env      print `export BILTEN_PINOT_*=...` lines
#   dev/pinot.sh logs [N] tail the Pinot log
#   dev/pinot.sh smoke [--realtime]
#                         create a small OFFLINE table, ingest 5 rows, check select count(*)
#                         (--realtime: also a REALTIME table fed from Kafka on
#                         $BILTEN_PINOT_KAFKA_BOOTSTRAP with Confluent-framed Avro; needs a
#                         running broker, e.g. dev/kafka.sh start, and the repo .venv)
#   dev/pinot.sh clean    stop and delete the data dir
#
# Settings (environment):
#   BILTEN_CACHE_DIR             jar cache root (default ~/.cache/bilten); jars go to
#                                $BILTEN_CACHE_DIR/pinot-<version>/lib
#   BILTEN_PINOT_DIR             data dir: ZK data, segments, logs, pid files (default /tmp/bilten-pinot)
#   BILTEN_PINOT_CLUSTER         Helix cluster name (default bilten)
#   BILTEN_PINOT_ZK_PORT         ZooKeeper client port (default 2181)
#   BILTEN_PINOT_CONTROLLER_PORT controller HTTP port (default 9000)
#   BILTEN_PINOT_BROKER_PORT     broker HTTP/query port (default 8099)
#   BILTEN_PINOT_SERVER_PORT     server netty port (default 8098); admin port 8097, gRPC 8090
#   BILTEN_PINOT_SERVER_ADMIN_PORT, BILTEN_PINOT_SERVER_GRPC_PORT
#   BILTEN_PINOT_HEAP            Pinot JVM max heap (default 2g; -Xms is 512m)
#   BILTEN_PINOT_ZK_HEAP         ZooKeeper JVM max heap (default 256m)
#   BILTEN_PINOT_JVM_OPTS        extra JVM options for the Pinot JVM
#   BILTEN_PINOT_SHIMS           1 (default): put dev/pinot/shim on the classpath (kafka30 alias and
#                                the Confluent registry client); 0: leave it off
#   BILTEN_PINOT_START_TIMEOUT   seconds to wait for health (default 180)
#   BILTEN_PINOT_STOP_TIMEOUT    seconds to wait after SIGTERM before SIGKILL (default 60)
#   BILTEN_PINOT_KAFKA_BOOTSTRAP Kafka for `smoke --realtime` (default 127.0.0.1:9092)
#   MVN                          Maven command (default mvn)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
TEMPLATE_DIR="$SCRIPT_DIR/pinot"

# 0.11.0 is the newest release whose pinot-server and pinot-tools Maven Central serves to us.
PINOT_VERSION="0.11.0"
CACHE_ROOT="${BILTEN_CACHE_DIR:-$HOME/.cache/bilten}"
PINOT_HOME="$CACHE_ROOT/pinot-$PINOT_VERSION"
LIB="$PINOT_HOME/lib"
PDIR="${BILTEN_PINOT_DIR:-/tmp/bilten-pinot}"
CLUSTER="${BILTEN_PINOT_CLUSTER:-bilten}"
HOST=127.0.0.1
ZK_PORT="${BILTEN_PINOT_ZK_PORT:-2181}"
CONTROLLER_PORT="${BILTEN_PINOT_CONTROLLER_PORT:-9000}"
BROKER_PORT="${BILTEN_PINOT_BROKER_PORT:-8099}"
SERVER_PORT="${BILTEN_PINOT_SERVER_PORT:-8098}"
SERVER_ADMIN_PORT="${BILTEN_PINOT_SERVER_ADMIN_PORT:-8097}"
SERVER_GRPC_PORT="${BILTEN_PINOT_SERVER_GRPC_PORT:-8090}"
HEAP="${BILTEN_PINOT_HEAP:-2g}"
ZK_HEAP="${BILTEN_PINOT_ZK_HEAP:-256m}"
SHIMS="${BILTEN_PINOT_SHIMS:-1}"
START_TIMEOUT="${BILTEN_PINOT_START_TIMEOUT:-180}"
STOP_TIMEOUT="${BILTEN_PINOT_STOP_TIMEOUT:-60}"
KAFKA_BOOTSTRAP="${BILTEN_PINOT_KAFKA_BOOTSTRAP:-127.0.0.1:9092}"
MVN="${MVN:-mvn}"
DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

CONF="$PDIR/conf"
LOGS="$PDIR/logs"
ZK_PIDFILE="$PDIR/zookeeper.pid"
PINOT_PIDFILE="$PDIR/pinot.pid"
ZK_OUT="$LOGS/zookeeper.out"
PINOT_OUT="$LOGS/pinot.out"
PINOT_LOG="$LOGS/pinot.log"
ZK_LOG="$LOGS/zookeeper.log"
CONTROLLER_URL="http://$HOST:$CONTROLLER_PORT"
BROKER_URL="http://$HOST:$BROKER_PORT"
SERVER_ADMIN_URL="http://$HOST:$SERVER_ADMIN_PORT"

log() { printf 'pinot.sh: %s\n' "$*" >&2; }
die() { printf 'pinot.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites

find_java() {
  local java=""
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    java="$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    java="$(command -v java)"
  fi
  if [[ -z "$java" ]] || ! command -v "$(dirname "$java")/javac" >/dev/null 2>&1; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
      log "no JDK found: installing Debian's openjdk-17-jdk-headless"
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 \
        --no-install-recommends openjdk-17-jdk-headless >&2
      java="$(command -v java)" || die "java still missing after apt-get install"
    else
      die "no JDK: Pinot $PINOT_VERSION needs Java 11+ and javac (set JAVA_HOME or put java on PATH)"
    fi
  fi
  local major
  major="$("$java" -XshowSettings:properties -version 2>&1 \
    | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p' | head -n1)"
  if [[ -z "$major" || "$major" -lt 11 ]]; then
    die "$java is Java ${major:-?}; Pinot $PINOT_VERSION needs Java 11+"
  fi
  JAVA="$java"
  JAVAC="$(dirname "$java")/javac"
  JAR="$(dirname "$java")/jar"
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
    die "Pinot jars are not cached in $LIB and Maven ($MVN) is not installed"
  fi
}

# ---------------------------------------------------------------- jars

jars_cached() { [[ -f "$PINOT_HOME/.complete" && -d "$LIB" ]]; }

fetch_jars() {
  if ! jars_cached; then
    mkdir -p "$CACHE_ROOT"
    # One fetch at a time per version (CI jobs or two shells starting at once).
    exec 8>"$CACHE_ROOT/.pinot-$PINOT_VERSION.lock"
    flock 8
    if ! jars_cached; then
      find_mvn
      local tmp="$PINOT_HOME.tmp.$$" t0=$SECONDS
      rm -rf "$tmp"
      mkdir -p "$tmp"
      log "fetching org.apache.pinot:*:$PINOT_VERSION + ZooKeeper and their runtime dependencies from Maven Central (cold: ~1-3 min, ~200 MB)"
      if ! "$MVN" -B -q -f "$TEMPLATE_DIR/pom.xml" \
            "$DEPENDENCY_PLUGIN:copy-dependencies" \
            -DincludeScope=runtime -DoutputDirectory="$tmp/lib" >"$tmp/mvn.log" 2>&1; then
        tail -n 40 "$tmp/mvn.log" >&2
        rm -rf "$tmp"
        die "Maven could not fetch the Pinot $PINOT_VERSION jars (log above)"
      fi
      local j
      for j in pinot-tools pinot-controller pinot-broker pinot-server pinot-kafka-2.0 pinot-confluent-avro; do
        [[ -f "$tmp/lib/$j-$PINOT_VERSION.jar" ]] \
          || { rm -rf "$tmp"; die "Maven ran but $j-$PINOT_VERSION.jar is missing"; }
      done
      rm -f "$tmp/mvn.log"
      echo "$PINOT_VERSION" >"$tmp/.complete"
      rm -rf "$PINOT_HOME"
      mv "$tmp" "$PINOT_HOME"
      log "fetched $(find "$LIB" -name '*.jar' | wc -l) jars ($(du -sh "$LIB" | cut -f1)) into $LIB in $((SECONDS - t0)) s"
    fi
    exec 8>&-
  fi
  build_shim
}

# The shim jar (dev/pinot/shim/src): rebuilt when its sources change; ~2 s with javac.
build_shim() {
  SHIM_JAR=""
  [[ "$SHIMS" == 1 ]] || return 0
  local src="$TEMPLATE_DIR/shim/src" sum
  sum="$(cd "$src" && find . -name '*.java' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)"
  SHIM_JAR="$PINOT_HOME/shim/bilten-pinot-shim-$sum.jar"
  [[ -f "$SHIM_JAR" ]] && return 0
  local tmp="$PINOT_HOME/shim/tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/classes"
  # shellcheck disable=SC2046  # one argument per source file
  "$JAVAC" --release 11 -nowarn -cp "$LIB/*" -d "$tmp/classes" $(find "$src" -name '*.java') \
    >"$tmp/javac.log" 2>&1 || { cat "$tmp/javac.log" >&2; rm -rf "$tmp"; die "javac of the shim failed"; }
  "$JAR" cf "$tmp/shim.jar" -C "$tmp/classes" .
  rm -f "$PINOT_HOME"/shim/bilten-pinot-shim-*.jar
  mv "$tmp/shim.jar" "$SHIM_JAR"
  rm -rf "$tmp"
  log "built $SHIM_JAR"
}

classpath() {
  if [[ -n "${SHIM_JAR:-}" ]]; then echo "$SHIM_JAR:$LIB/*"; else echo "$LIB/*"; fi
}

# ---------------------------------------------------------------- process

# The pid in a pid file, if that process is alive and its command line has $2 in it.
running_pid() {
  local pidfile="$1" marker="$2" pid cmdline
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmdline" == *"$marker"* && "$cmdline" == *"$CONF/"* ]] || return 1
  echo "$pid"
}
zk_pid() { running_pid "$ZK_PIDFILE" ZooKeeperServerMain; }
pinot_pid() { running_pid "$PINOT_PIDFILE" PinotAdministrator; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

zk_ok() {
  local reply
  reply="$( (exec 3<>"/dev/tcp/$HOST/$ZK_PORT" && printf 'ruok' >&3 && timeout 3 cat <&3) 2>/dev/null || true)"
  [[ "$reply" == imok ]]
}

http_ok() {  # URL -> 0 when it answers 200
  [[ "$(curl -s -o /dev/null -m 3 -w '%{http_code}' "$1" 2>/dev/null || true)" == 200 ]]
}

healthy() {
  http_ok "$CONTROLLER_URL/health" && http_ok "$BROKER_URL/health" && http_ok "$SERVER_ADMIN_URL/health"
}

log_tail() {
  local f
  for f in "$ZK_OUT" "$PINOT_OUT"; do
    if [[ -s "$f" ]]; then
      printf -- '----- last 15 lines of %s -----\n' "$f" >&2
      tail -n 15 "$f" >&2
    fi
  done
  if [[ -s "$PINOT_LOG" ]]; then
    printf -- '----- last WARN/ERROR lines of %s -----\n' "$PINOT_LOG" >&2
    grep -E '^[0-9-]+ [0-9:.]+ (WARN|ERROR|FATAL) ' "$PINOT_LOG" | tail -n 15 >&2 || true
    printf -- '----- last 25 lines of %s -----\n' "$PINOT_LOG" >&2
    tail -n 25 "$PINOT_LOG" >&2
  fi
}

render_config() {
  mkdir -p "$CONF"
  local f
  for f in zoo.cfg controller.conf broker.conf server.conf; do
    sed -e "s#@CLUSTER@#$CLUSTER#g" -e "s#@ZK_PORT@#$ZK_PORT#g" \
        -e "s#@CONTROLLER_PORT@#$CONTROLLER_PORT#g" -e "s#@BROKER_PORT@#$BROKER_PORT#g" \
        -e "s#@SERVER_NETTY_PORT@#$SERVER_PORT#g" -e "s#@SERVER_ADMIN_PORT@#$SERVER_ADMIN_PORT#g" \
        -e "s#@SERVER_GRPC_PORT@#$SERVER_GRPC_PORT#g" -e "s#@DATA_DIR@#$PDIR#g" \
        "$TEMPLATE_DIR/conf/$f.in" >"$CONF/$f.tmp"
    mv "$CONF/$f.tmp" "$CONF/$f"
  done
}

# Java 17 flags Pinot's own scripts use for JDK 17 (off-heap buffers, reflection into java.base).
ADD_OPENS=(--add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/java.lang=ALL-UNNAMED --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED --add-opens=java.base/java.io=ALL-UNNAMED
  --add-opens=java.base/jdk.internal.misc=ALL-UNNAMED --add-exports=java.base/jdk.internal.misc=ALL-UNNAMED
  --add-opens=java.base/jdk.internal.ref=ALL-UNNAMED)

spawn() {  # PIDFILE OUTFILE CMD... : start detached (own session), record the java pid
  local pidfile="$1" out="$2"
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # $$ and $@ expand in the child shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$pidfile" "$@" \
    </dev/null >>"$out" 2>&1 8>&- 9>&- &
  local _
  for _ in $(seq 50); do [[ -s "$pidfile" ]] && break; sleep 0.1; done
  [[ -s "$pidfile" ]] || die "could not start java (see $out)"
}

start_zk() {
  local pid deadline=$((SECONDS + 60))
  if pid="$(zk_pid)"; then
    log "ZooKeeper already running (pid $pid)"
  else
    if port_open "$HOST" "$ZK_PORT"; then
      die "$HOST:$ZK_PORT is in use by another process (set BILTEN_PINOT_ZK_PORT)"
    fi
    mkdir -p "$PDIR/zookeeper"
    : >"$ZK_OUT"
    spawn "$ZK_PIDFILE" "$ZK_OUT" "$JAVA" -Xms32m -Xmx"$ZK_HEAP" -XX:+UseSerialGC \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$TEMPLATE_DIR/log4j2.xml" -Dbilten.pinot.log.file="$ZK_LOG" \
      -Dzookeeper.jmx.log4j.disable=true \
      -cp "$LIB/*" org.apache.zookeeper.server.ZooKeeperServerMain "$CONF/zoo.cfg"
    pid="$(cat "$ZK_PIDFILE")"
  fi
  until zk_ok; do
    if ! kill -0 "$pid" 2>/dev/null; then log_tail; die "ZooKeeper (pid $pid) exited during startup"; fi
    ((SECONDS < deadline)) || { log_tail; die "ZooKeeper not answering ruok on $HOST:$ZK_PORT after 60 s"; }
    sleep 0.3
  done
}

start_pinot() {
  local pid p
  for p in "$CONTROLLER_PORT" "$BROKER_PORT" "$SERVER_PORT" "$SERVER_ADMIN_PORT" "$SERVER_GRPC_PORT"; do
    if port_open "$HOST" "$p"; then
      die "$HOST:$p is already in use by another process (see the BILTEN_PINOT_*_PORT settings)"
    fi
  done
  mkdir -p "$PDIR/tmp"
  : >"$PINOT_OUT"
  if [[ -s "$PINOT_LOG" ]]; then mv -f "$PINOT_LOG" "$PINOT_LOG.previous-run"; fi
  local jvm=(-Xms512m -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=200 -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Djava.io.tmpdir="$PDIR/tmp"
    "-Xlog:gc*:file=$LOGS/gc.log:time,tags:filecount=3,filesize=20M"
    -Dlog4j2.configurationFile="$TEMPLATE_DIR/log4j2.xml" -Dbilten.pinot.log.file="$PINOT_LOG"
    "${ADD_OPENS[@]}")
  # shellcheck disable=SC2206  # word splitting of the extra options is intended
  [[ -n "${BILTEN_PINOT_JVM_OPTS:-}" ]] && jvm+=(${BILTEN_PINOT_JVM_OPTS})
  spawn "$PINOT_PIDFILE" "$PINOT_OUT" "$JAVA" "${jvm[@]}" -cp "$(classpath)" \
    org.apache.pinot.tools.admin.PinotAdministrator StartServiceManager \
    -zkAddress "$HOST:$ZK_PORT" -clusterName "$CLUSTER" -port -1 \
    -bootstrapConfigPaths "$CONF/controller.conf" "$CONF/broker.conf" "$CONF/server.conf"
}

wait_healthy() {
  local pid="$1" deadline=$((SECONDS + START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log_tail
      rm -f "$PINOT_PIDFILE"
      die "Pinot (pid $pid) exited during startup; logs in $LOGS (ZooKeeper still runs: dev/pinot.sh stop)"
    fi
    healthy && return 0
    sleep 0.5
  done
  log_tail
  die "Pinot (pid $pid) not healthy after ${START_TIMEOUT}s (controller $CONTROLLER_URL/health, broker $BROKER_URL/health, server $SERVER_ADMIN_URL/health); still running, logs in $LOGS (dev/pinot.sh stop to end it)"
}

lock_dir() {
  mkdir -p "$PDIR" "$LOGS"
  exec 9>"$PDIR/.lock"
  flock 9
}

cmd_start() {
  local t0=$SECONDS pid
  lock_dir
  find_java
  fetch_jars
  render_config
  start_zk
  if pid="$(pinot_pid)"; then
    log "Pinot already running (pid $pid)"
  else
    log "starting Pinot $PINOT_VERSION (controller :$CONTROLLER_PORT, broker :$BROKER_PORT, server :$SERVER_PORT, heap $HEAP, data $PDIR)"
    start_pinot
    pid="$(cat "$PINOT_PIDFILE")"
  fi
  wait_healthy "$pid"
  log "ready in $((SECONDS - t0)) s: controller $CONTROLLER_URL, broker $BROKER_URL (pids: pinot $pid, zookeeper $(cat "$ZK_PIDFILE"))"
  echo "$BROKER_URL"
}

stop_one() {  # NAME PID
  local name="$1" pid="$2"
  log "stopping $name pid $pid (SIGTERM, up to ${STOP_TIMEOUT}s)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name pid $pid still alive after ${STOP_TIMEOUT}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
}

cmd_stop() {
  local pid any=0
  lock_dir
  # Pinot first: its shutdown deregisters from ZooKeeper.
  if pid="$(pinot_pid)"; then stop_one Pinot "$pid"; any=1; fi
  rm -f "$PINOT_PIDFILE"
  if pid="$(zk_pid)"; then stop_one ZooKeeper "$pid"; any=1; fi
  rm -f "$ZK_PIDFILE"
  if ((any)); then log "stopped (data kept in $PDIR)"; else log "not running"; fi
}

cmd_status() {
  local zpid ppid
  zpid="$(zk_pid || true)"
  ppid="$(pinot_pid || true)"
  if [[ -n "$zpid" && -n "$ppid" ]] && healthy; then
    local rss
    rss="$(ps -o rss= -p "$ppid" -p "$zpid" | awk '{s+=$1} END {printf "%d", s/1024}')"
    echo "running pinot_pid=$ppid zookeeper_pid=$zpid controller=$CONTROLLER_URL broker=$BROKER_URL version=$PINOT_VERSION rss_mb=$rss dir=$PDIR"
    return 0
  fi
  if [[ -n "$zpid" || -n "$ppid" ]]; then
    echo "unhealthy pinot_pid=${ppid:--} zookeeper_pid=${zpid:--} controller=$CONTROLLER_URL broker=$BROKER_URL dir=$PDIR (starting, or a part is down: dev/pinot.sh logs)"
    return 1
  fi
  echo "stopped controller=$CONTROLLER_URL broker=$BROKER_URL dir=$PDIR"
  return 3
}

cmd_env() {
  echo "export BILTEN_PINOT_CONTROLLER_URL=$CONTROLLER_URL"
  echo "export BILTEN_PINOT_BROKER_URL=$BROKER_URL"
  echo "export BILTEN_PINOT_ZK=$HOST:$ZK_PORT"
}

cmd_smoke() {
  local python="${BILTEN_PYTHON:-$REPO_DIR/.venv/bin/python}"
  [[ -x "$python" ]] || python=python3
  healthy || die "Pinot is not running (dev/pinot.sh start)"
  "$python" "$TEMPLATE_DIR/smoke.py" --controller "$CONTROLLER_URL" --broker "$BROKER_URL" \
    --kafka "$KAFKA_BOOTSTRAP" "$@"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  fetch) find_java; fetch_jars; echo "$LIB" ;;
  env) cmd_env ;;
  logs) tail -n "${2:-100}" "$PINOT_LOG" ;;
  smoke) shift; cmd_smoke "$@" ;;
  clean) cmd_stop; rm -rf "$PDIR"; log "removed $PDIR" ;;
  *) echo "usage: $0 start|stop|status|restart|fetch|env|logs [N]|smoke [--realtime]|clean" >&2; exit 2 ;;
esac
