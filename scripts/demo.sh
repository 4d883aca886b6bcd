#!/usr/bin/env bash
# A grpcurl session against a running stack (make dev runs it): create an app and its keys,
# upsert a user by external_id, add an alias, register a push subscription with the client key,
# log it in, track an event, and read the profile back by alias. Every call is printed first,
# so it doubles as a copy-paste tutorial.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GRPCURL=${GRPCURL:-$ROOT/.venv/bin/grpcurl}
IDENTITY=${IDENTITY:-127.0.0.1:50051}
ADMIN_KEY=${TIDINGS_ADMIN_KEY:-dev-admin-key}
PY=$ROOT/.venv/bin/python

# call <key> <method> <json>: print the call, run it, print the answer (indented).
call() {
  local key=$1 method=$2 body=$3
  printf '\n$ grpcurl -plaintext -H "authorization: Bearer %s" -d '"'"'%s'"'"' %s %s\n' \
    "${key:0:12}…" "$body" "$IDENTITY" "$method" >&2
  local answer
  answer=$("$GRPCURL" -plaintext -H "authorization: Bearer $key" -d "$body" "$IDENTITY" "$method")
  # The transcript goes to stderr; stdout carries the answer for the caller to read fields from.
  printf '%s\n' "$answer" >&2
  printf '%s\n' "$answer"
}
field() { "$PY" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

suffix=$(date +%s)
apns_token=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
app_id=$(call "$ADMIN_KEY" tidings.identity.v1.AppsService/CreateApp \
  "{\"app\": {\"display_name\": \"Demo $suffix\", \"settings\": {\"allow_client_login\": true}}}" \
  | field app_id)
server_key=$(call "$ADMIN_KEY" tidings.identity.v1.AppsService/CreateApiKey \
  "{\"app_id\": \"$app_id\", \"scope\": \"API_KEY_SCOPE_SERVER\", \"display_name\": \"backend\"}" \
  | field secret)
client_key=$(call "$ADMIN_KEY" tidings.identity.v1.AppsService/CreateApiKey \
  "{\"app_id\": \"$app_id\", \"scope\": \"API_KEY_SCOPE_CLIENT\", \"display_name\": \"ios sdk\"}" \
  | field secret)

call "$server_key" tidings.identity.v1.IdentityService/UpsertUser \
  '{"ref": {"external_id": "crm-42"}, "user": {"first_name": "Ana", "email": "ana@example.com", "timezone": "Europe/Madrid", "attributes": {"plan": {"string_value": "gold"}}}}' >/dev/null
call "$server_key" tidings.identity.v1.IdentityService/AddAlias \
  '{"ref": {"external_id": "crm-42"}, "alias": {"label": "crm_id", "value": "A-0042"}}' >/dev/null
subscription_id=$(call "$client_key" tidings.identity.v1.IdentityService/CreateSubscription \
  "{\"subscription\": {\"type\": \"SUBSCRIPTION_TYPE_IOS_PUSH\", \"token\": \"$apns_token\", \"device\": {\"model\": \"iPhone15,2\", \"os\": \"iOS 18.1\"}}}" \
  | field subscription_id)
call "$client_key" tidings.identity.v1.IdentityService/Login \
  "{\"subscription_id\": \"$subscription_id\", \"external_id\": \"crm-42\"}" >/dev/null
call "$client_key" tidings.identity.v1.IdentityService/TrackEvents \
  "{\"events\": [{\"user\": {\"subscription_id\": \"$subscription_id\"}, \"name\": \"purchase\", \"properties\": {\"amount\": 30, \"currency\": \"EUR\"}}]}" >/dev/null
call "$server_key" tidings.identity.v1.IdentityService/GetUser \
  '{"ref": {"alias": {"label": "crm_id", "value": "A-0042"}}}' >/dev/null
printf '\nDemo app %s — server key %s, client key %s\n' "$app_id" "$server_key" "$client_key" >&2
