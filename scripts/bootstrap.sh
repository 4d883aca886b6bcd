#!/usr/bin/env bash
# Creates .venv with Python 3.11 and installs the project with its dev tools from PyPI.
# Re-runs only when pyproject.toml changed since the last successful install.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
STAMP=$VENV/.installed
cd "$ROOT"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then exit 0; fi

find_python() {
  local candidate
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

PY=$(find_python) || {
  [ "$(id -u)" = 0 ] || { echo "Python 3.11 is required (apt-get install python3.11 python3.11-venv)" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv >/dev/null
  PY=$(find_python)
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating .venv with $PY" >&2
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian splits ensurepip out of the interpreter package.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-venv >/dev/null
    rm -rf "$VENV" && "$PY" -m venv "$VENV"
  fi
fi
echo "[bootstrap] installing Python dependencies into .venv" >&2
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
touch "$STAMP"
