#!/usr/bin/env bash
# Validates docker-compose.yml offline: no docker engine is needed (CI and the dev machines have
# none). `config -q` parses the file, resolves anchors, merges and ${VARIABLES}, and checks the
# result against the Compose Specification schema (unknown keys, wrong types, depends_on on a
# service that does not exist, bad healthcheck or port syntax...). Exits non-zero on any error.
#
#   scripts/check_compose.sh [FILE]     default: docker-compose.yml at the repository root
#
# It uses the Compose v2 plugin (`docker compose`) where a developer has one, else Debian's
# `docker-compose` (v1.29, a Python program), installed here from Debian's packages if missing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FILE=${1:-$ROOT/docker-compose.yml}
EXPECTED_SERVICES="delivery identity journey kafka postgres"

log() { printf '[check_compose] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$FILE" ] || die "no such file: $FILE"

install_docker_compose() {
  [ "$(id -u)" = 0 ] || die "docker-compose is missing; install it with: sudo apt-get install --no-install-recommends docker-compose"
  log "installing docker-compose from Debian's packages"
  # Without recommends: docker.io (the engine) is not needed to validate a file.
  local install=(apt-get install -y -qq --no-install-recommends docker-compose)
  if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null 2>&1; then
    # A fresh machine's package lists may be empty or stale; refresh them only then.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${install[@]}" >/dev/null
  fi
}

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  command -v docker-compose >/dev/null || install_docker_compose
  compose=(docker-compose)
fi

# The file's own directory is the project directory, so relative paths resolve as in `up`.
dc() { "${compose[@]}" --project-directory "$(dirname "$FILE")" -f "$FILE" "$@"; }

if ! errors=$(dc config -q 2>&1); then
  log "$FILE is not a valid compose file (${compose[*]} config):"
  printf '%s\n' "$errors" >&2
  exit 1
fi

services=$(dc config --services | sort | tr '\n' ' ' | sed 's/ $//')
[ "$services" = "$EXPECTED_SERVICES" ] \
  || die "$FILE defines services [$services], expected [$EXPECTED_SERVICES]"

log "$FILE is valid (${compose[*]} config; services: $services)"
