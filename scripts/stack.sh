#!/usr/bin/env bash
# The native local stack: PostgreSQL (Debian's packages) and Apache Kafka 4.x in KRaft mode
# (jars from Maven Central) as plain processes, with all state under $TIDINGS_STACK_DIR.
#
#   scripts/stack.sh up      install what is missing, start both, create databases; idempotent
#   scripts/stack.sh down    stop both (state is kept)
#   scripts/stack.sh status  say what runs
#   scripts/stack.sh reset   stop both and delete the state
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK=${TIDINGS_STACK_DIR:-$ROOT/.stack}
PG_PORT=${TIDINGS_PG_PORT:-55432}
KAFKA_PORT=${TIDINGS_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${TIDINGS_KAFKA_CONTROLLER_PORT:-19093}
PG_USER=tidings
PG_PASSWORD=tidings
DATABASES=(tidings_identity tidings_journey tidings_delivery)

log() { printf '[stack] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

wait_for() { # wait_for <seconds> <description> <command...>
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      [ -z "${WAIT_LOG:-}" ] || tail -n 30 "$WAIT_LOG" >&2
      die "$what did not come up within ${secs}s"
    fi
    sleep 0.3
  done
}

apt_install() {
  [ "$(id -u)" = 0 ] || die "missing $*; install it with: sudo apt-get install $*"
  log "installing $* from Debian's packages"
  if [ ! -f "$STACK/.apt-updated" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    mkdir -p "$STACK" && touch "$STACK/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------- PostgreSQL
pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$dir" ]; then
    apt_install postgresql postgresql-contrib
    dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  printf '%s' "$dir"
}

# initdb and postgres refuse to run as root: as root they run as Debian's `postgres` user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The postgres user must be able to reach the state folder; a clone made by `mktemp -d` is 0700.
open_path_for_postgres() {
  [ "$(id -u)" = 0 ] || return 0
  local dir=$1 chain=()
  while [ "$dir" != / ]; do chain=("$dir" "${chain[@]}"); dir=$(dirname "$dir"); done
  for dir in "${chain[@]}"; do  # outermost first: a folder is reachable once its parents are
    if ! runuser -u postgres -- test -x "$dir" 2>/dev/null; then
      log "granting traverse permission (o+x) on $dir so the postgres user can reach its data"
      chmod o+x "$dir"
    fi
  done
}

pg_running() { [ -f "$STACK/pg/data/postmaster.pid" ] && as_pg "$(pg_bin)/pg_ctl" -D "$STACK/pg/data" status >/dev/null 2>&1; }

pg_up() {
  local bin; bin=$(pg_bin)
  mkdir -p "$STACK/pg"
  open_path_for_postgres "$STACK/pg"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$STACK/pg"; fi
  if [ ! -f "$STACK/pg/data/PG_VERSION" ]; then
    log "initdb into $STACK/pg/data"
    local pwfile="$STACK/pg/pwfile"
    printf '%s\n' "$PG_PASSWORD" > "$pwfile"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$pwfile"; fi
    as_pg "$bin/initdb" -D "$STACK/pg/data" -U "$PG_USER" --pwfile="$pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    mkdir -p "$STACK/pg/run"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$STACK/pg/run"; fi
    # Tuned for a development laptop and CI: fsync off only loses data if the OS itself crashes.
    cat >> "$STACK/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$STACK/pg/run'
max_connections = 400
shared_buffers = 512MB
work_mem = 32MB
maintenance_work_mem = 256MB
fsync = off
full_page_writes = off
max_wal_size = 4GB
log_min_duration_statement = 2000
CONF
  fi
  if pg_running; then
    log "postgres already running on 127.0.0.1:$PG_PORT"
  else
    log "starting postgres on 127.0.0.1:$PG_PORT"
    as_pg "$bin/pg_ctl" -D "$STACK/pg/data" -l "$STACK/pg/postgres.log" -w -t 60 start >/dev/null \
      || { tail -n 20 "$STACK/pg/postgres.log" >&2; die "postgres failed to start"; }
  fi
  local db
  for db in "${DATABASES[@]}"; do
    if ! psql_q postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      psql_q postgres -c "CREATE DATABASE $db" >/dev/null
      log "created database $db"
    fi
  done
}

psql_q() { local db=$1; shift; as_pg psql -h "$STACK/pg/run" -p "$PG_PORT" -U "$PG_USER" -d "$db" -v ON_ERROR_STOP=1 "$@"; }

pg_down() {
  if pg_running; then
    log "stopping postgres"
    as_pg "$(pg_bin)/pg_ctl" -D "$STACK/pg/data" -m fast -w -t 60 stop >/dev/null
  fi
}

# ---------------------------------------------------------------- Kafka
kafka_libs() {
  local libs="$STACK/kafka/libs" pom="$ROOT/scripts/kafka/pom.xml"
  if [ ! -f "$libs/.complete" ] || [ "$pom" -nt "$libs/.complete" ]; then
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    command -v mvn >/dev/null || apt_install maven
    log "fetching Kafka jars from Maven Central into $libs"
    rm -rf "$libs"
    mkdir -p "$STACK/kafka"
    mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$libs" > "$STACK/kafka/maven.log" 2>&1 \
      || { cat "$STACK/kafka/maven.log" >&2; die "could not fetch the Kafka jars with Maven"; }
    touch "$libs/.complete"
  fi
}

KAFKA_JVM=(-Xms256m -Xmx1g -XX:+UseG1GC -Dorg.slf4j.simpleLogger.defaultLogLevel=info
  -Dorg.slf4j.simpleLogger.showDateTime=true -cp "$STACK/kafka/libs/*")
kafka_java() { java "${KAFKA_JVM[@]}" "$@"; }

kafka_pid() { [ -f "$STACK/kafka/kafka.pid" ] && kill -0 "$(cat "$STACK/kafka/kafka.pid")" 2>/dev/null && cat "$STACK/kafka/kafka.pid"; }

kafka_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; }

kafka_up() {
  kafka_libs
  local dir="$STACK/kafka" conf="$STACK/kafka/server.properties"
  mkdir -p "$dir/data"
  cat > "$conf" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=12
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
CONF
  if [ ! -f "$dir/data/meta.properties" ]; then
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    log "formatting Kafka storage (cluster $cluster_id)"
    kafka_java kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$conf" >/dev/null 2>&1 \
      || die "kafka storage format failed"
  fi
  if kafka_pid >/dev/null; then
    log "kafka already running on 127.0.0.1:$KAFKA_PORT"
  else
    log "starting kafka on 127.0.0.1:$KAFKA_PORT"
    nohup java "${KAFKA_JVM[@]}" kafka.Kafka "$conf" > "$dir/kafka.log" 2>&1 < /dev/null &
    echo $! > "$dir/kafka.pid"
  fi
  WAIT_LOG="$dir/kafka.log" wait_for 90 "kafka" kafka_answers
  # The port opens before the broker has joined its own quorum; ask it for its metadata.
  WAIT_LOG="$dir/kafka.log" wait_for 90 "kafka metadata" kafka_java org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list
}

kafka_down() {
  local pid
  if pid=$(kafka_pid); then
    log "stopping kafka"
    kill "$pid"
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null; do
      if ((SECONDS > deadline)); then kill -9 "$pid"; break; fi
      sleep 0.3
    done
  fi
  rm -f "$STACK/kafka/kafka.pid"
}

# ---------------------------------------------------------------- main
status() {
  if pg_running; then echo "postgres: running on 127.0.0.1:$PG_PORT"; else echo "postgres: stopped"; fi
  if kafka_pid >/dev/null; then echo "kafka:    running on 127.0.0.1:$KAFKA_PORT"; else echo "kafka:    stopped"; fi
}

case "${1:-}" in
  up) mkdir -p "$STACK"; pg_up; kafka_up; status ;;
  down) kafka_down; pg_down ;;
  status) status ;;
  reset) kafka_down; pg_down; rm -rf "$STACK/pg" "$STACK/kafka/data" ;;
  *) echo "usage: $0 up|down|status|reset" >&2; exit 2 ;;
esac
