#!/usr/bin/env bash
# Brings the compose cluster (deploy/compose.yaml: 3 coordinators, 4 nodes, mutual TLS) up from
# an image built here, rolls 4.2.1 out, checks every node runs it permanently and healthy, rolls
# out a broken release and checks it was rolled back, then tears everything down (also on
# failure). Exit 0 only if all of that held.
#
#   deploy/try.sh                  # builds orchestrator:latest (release) first
#   PROFILE=dev deploy/try.sh      # reuses a debug build (what CI does)
#   KEEP=1 deploy/try.sh           # leave the cluster running afterwards
#
# Needs docker, docker-compose, curl and python3 (for a free port).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
export ORCH_IMAGE=${ORCH_IMAGE:-orchestrator:try}
PROJECT=${PROJECT:-orchtry$$}
# Where c1's dashboard is published (127.0.0.1 only): a free port unless given.
ORCH_DASHBOARD_PORT=${ORCH_DASHBOARD_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export ORCH_DASHBOARD_PORT
compose() { docker-compose -f deploy/compose.yaml -p "$PROJECT" "$@"; }
cli() { compose run --rm -T cli "$@"; }
certs=
cleanup() {
    status=$?
    [ -z "$certs" ] || rm -rf "$certs"
    if [ "$status" -ne 0 ]; then
        echo "--- try.sh failed; the last lines of every container:" >&2
        compose logs --tail 30 >&2 || true
    fi
    if [ -z "${KEEP:-}" ]; then compose down -v --remove-orphans >/dev/null 2>&1 || true; fi
    exit "$status"
}
trap cleanup EXIT

PROFILE=$PROFILE TAG=$ORCH_IMAGE deploy/image/build.sh
compose up -d
for i in $(seq 1 60); do
    if out=$(cli nodes --json 2>/dev/null) &&
        [ "$(grep -o '"healthy":true' <<<"$out" | wc -l)" -eq 4 ]; then
        break
    fi
    [ "$i" -lt 60 ] || { echo "the 4 nodes did not register healthy within 60 s" >&2; exit 1; }
    sleep 1
done
echo "cluster up: 3 coordinators, 4 nodes on 4.2.0"
cli cluster status

# The dashboard and API published on localhost, with the viewer certificate the init step made.
certs=$(mktemp -d)
for f in ca.pem cert.pem key.pem; do
    # The image has no cat: the shell's own read and printf copy the file out.
    compose run --rm -T --entrypoint /bin/sh cli -c \
        'while IFS= read -r l || [ -n "$l" ]; do printf "%s\n" "$l"; done < "$1"' \
        sh "/certs/viewer-dashboard/$f" >"$certs/$f"
done
api() {
    curl -sS --fail --max-time 10 --cacert "$certs/ca.pem" --cert "$certs/cert.pem" \
        --key "$certs/key.pem" "https://localhost:$ORCH_DASHBOARD_PORT$1"
}
for i in $(seq 1 30); do
    page=$(api / 2>/dev/null) && break
    [ "$i" -lt 30 ] || { echo "no dashboard on https://localhost:$ORCH_DASHBOARD_PORT/" >&2; exit 1; }
    sleep 1
done
grep -q "dashboard.js" <<<"$page" || { echo "/ is not the dashboard: $page" >&2; exit 1; }
n=$(api /api/v1/nodes | grep -o '"id":"n[1-4]"' | wc -l)
[ "$n" -eq 4 ] || { echo "expected 4 nodes from /api/v1/nodes" >&2; exit 1; }
api /metrics | grep -q '^orchestrator_raft_term' || { echo "no Raft metrics on /metrics" >&2; exit 1; }
if curl -sk --max-time 10 -o /dev/null -w '%{http_code}' "https://localhost:$ORCH_DASHBOARD_PORT/" | grep -qv 401; then
    echo "the dashboard answered a client without a certificate" >&2
    exit 1
fi
echo "dashboard: https://localhost:$ORCH_DASHBOARD_PORT/ serves viewers (and refuses others)"

cli rollout 4.2.1 --package /pkgs/ok/demo-service-4.2.1.zip --min-healthy-time 1s
out=$(cli nodes --json)
n=$(grep -o '"state":"permanent","version":"4.2.1"' <<<"$out" | wc -l)
[ "$n" -eq 4 ] || { echo "expected 4 nodes on 4.2.1 permanent: $out" >&2; exit 1; }
echo "rollout 4.2.1: every node runs it permanently"

if cli rollout 4.2.3 --package /pkgs/broken/demo-service-4.2.3.zip --min-healthy-time 1s \
    --healthy-deadline 20s; then
    echo "the broken release was not refused" >&2
    exit 1
fi
out=$(cli status --json)
grep -q '"phase":"rolled_back"' <<<"$out" || { echo "expected rolled_back: $out" >&2; exit 1; }
out=$(cli nodes --json)
n=$(grep -o '"state":"permanent","version":"4.2.1"' <<<"$out" | wc -l)
[ "$n" -eq 4 ] || { echo "expected every node back on 4.2.1: $out" >&2; exit 1; }
echo "broken 4.2.3: rolled back, every node on 4.2.1 again"
echo "try.sh: OK"
