#!/usr/bin/env bash
# Runs the three services as native processes against the local stack (scripts/stack.sh).
#
#   scripts/dev.sh up      start identity, journey and delivery (each its own process), wait until
#                          each health check answers SERVING, print how to reach them, then run
#                          the demos (scripts/demo.sh: identity; scripts/demo_story.sh: a journey
#                          with its statistics)
#   scripts/dev.sh down    SIGTERM them and wait for a clean exit
#   scripts/dev.sh status  say which run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK=${TIDINGS_STACK_DIR:-$ROOT/.stack}
PY=$ROOT/.venv/bin/python
GRPCURL=$ROOT/.venv/bin/grpcurl
RUN=$STACK/services
SERVICES=(identity journey delivery)
declare -A GRPC_PORT=([identity]=50051 [journey]=50052 [delivery]=50053)
declare -A METRICS_PORT=([identity]=9101 [journey]=9102 [delivery]=9103)
export PYTHONPATH=$ROOT:$ROOT/gen
export TIDINGS_LOG_FORMAT=${TIDINGS_LOG_FORMAT:-text}
export TIDINGS_ADMIN_KEY=${TIDINGS_ADMIN_KEY:-dev-admin-key}

log() { printf '[dev] %s\n' "$*" >&2; }

pid_of() { local f=$RUN/$1.pid; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"; }

serving() { "$GRPCURL" -plaintext -max-time 2 "127.0.0.1:$1" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; }

up() {
  mkdir -p "$RUN"
  local svc
  for svc in "${SERVICES[@]}"; do
    if pid_of "$svc" >/dev/null; then log "$svc already running"; continue; fi
    log "starting $svc (logs: $RUN/$svc.log)"
    nohup "$PY" -m "services.$svc" > "$RUN/$svc.log" 2>&1 < /dev/null &
    echo $! > "$RUN/$svc.pid"
  done
  for svc in "${SERVICES[@]}"; do
    local deadline=$((SECONDS + 60))
    until serving "${GRPC_PORT[$svc]}"; do
      if ! pid_of "$svc" >/dev/null; then tail -n 30 "$RUN/$svc.log" >&2; log "$svc exited"; exit 1; fi
      if ((SECONDS > deadline)); then tail -n 30 "$RUN/$svc.log" >&2; log "$svc is not SERVING after 60s"; exit 1; fi
      sleep 0.3
    done
    log "$svc SERVING on 127.0.0.1:${GRPC_PORT[$svc]} (metrics http://127.0.0.1:${METRICS_PORT[$svc]}/metrics)"
  done
  demo
}

demo() {
  cat <<TXT

Tidings is up. Each service lists its API through server reflection:

  .venv/bin/grpcurl -plaintext 127.0.0.1:50051 list
  .venv/bin/grpcurl -plaintext 127.0.0.1:50051 describe tidings.identity.v1.IdentityService
  .venv/bin/grpcurl -plaintext 127.0.0.1:50052 grpc.health.v1.Health/Check
  curl -s http://127.0.0.1:9103/metrics | head

Calls other than health and reflection need the key:  -H 'authorization: Bearer $TIDINGS_ADMIN_KEY'
Postgres: psql postgresql://tidings:tidings@127.0.0.1:55432/tidings_identity   Kafka: 127.0.0.1:19092
Logs: $RUN/<service>.log     Stop everything: make down

TXT
  local svc
  for svc in "${SERVICES[@]}"; do
    printf '$ grpcurl -plaintext 127.0.0.1:%s list\n' "${GRPC_PORT[$svc]}"
    "$GRPCURL" -plaintext "127.0.0.1:${GRPC_PORT[$svc]}" list | sed 's/^/  /'
  done
  printf '\nA first session with identity (scripts/demo.sh; run it again any time):\n'
  "$ROOT/scripts/demo.sh" 2>&1 >/dev/null
  printf '\nThe journey story (scripts/demo_story.sh; half a minute; docs/journey.md explains it):\n'
  "$ROOT/scripts/demo_story.sh" 2>&1 >/dev/null
}

down() {
  local svc pid
  for svc in "${SERVICES[@]}"; do
    if pid=$(pid_of "$svc"); then
      log "stopping $svc"
      kill -TERM "$pid"
      local deadline=$((SECONDS + 20))
      while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then log "$svc ignored SIGTERM; killing"; kill -KILL "$pid"; break; fi
        sleep 0.2
      done
    fi
    rm -f "$RUN/$svc.pid"
  done
}

status() {
  local svc
  for svc in "${SERVICES[@]}"; do
    if pid_of "$svc" >/dev/null; then echo "$svc: running (pid $(pid_of "$svc"))"; else echo "$svc: stopped"; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
