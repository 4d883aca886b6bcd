#!/usr/bin/env bash
# Generates Python messages, gRPC stubs and typed stubs (mypy-protobuf) from protos/ into gen/,
# and lints the protos with buf. Generated code is not committed: every entry point runs this.
#
#   scripts/protos.sh          generate (skipped when gen/ is newer than every .proto) and lint
#   scripts/protos.sh --force  generate even when up to date
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
OUT=$ROOT/gen
STAMP=$OUT/.stamp
cd "$ROOT/protos"

mapfile -t PROTOS < <(find tidings -name '*.proto' | sort)
if [ "${1:-}" != "--force" ] && [ -f "$STAMP" ] && \
   [ -z "$(find . -name '*.proto' -newer "$STAMP" -o -name buf.yaml -newer "$STAMP")" ]; then
  exit 0
fi

rm -rf "$OUT" && mkdir -p "$OUT"
# The well-known types (timestamp, struct, ...) ship inside grpc_tools.
WKT=$("$PY" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
# google/rpc and google/type protos ship with googleapis-common-protos (which also has their code).
GAPI=$("$PY" -c 'import google.rpc.status_pb2 as s, os; print(os.path.dirname(os.path.dirname(os.path.dirname(s.__file__))))')
"$PY" -m grpc_tools.protoc -I . -I "$WKT" -I "$GAPI" \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  "${PROTOS[@]}" 2> >(grep -v "^Writing mypy" >&2)
# Generated code imports `tidings.<x>.v1`: make each folder a regular package.
find "$OUT/tidings" -type d -exec touch {}/__init__.py \;

# No buf registry is reachable: lint a self-contained descriptor image built by protoc.
"$PY" -m grpc_tools.protoc -I . -I "$WKT" -I "$GAPI" --include_imports --include_source_info \
  -o "$OUT/image.binpb" "${PROTOS[@]}"
"$BIN/buf" lint "$OUT/image.binpb" --config buf.yaml --path tidings
touch "$STAMP"
echo "protos: generated $(find "$OUT" -name '*_pb2.py' | wc -l) modules into gen/, buf lint clean" >&2
