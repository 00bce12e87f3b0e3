#!/bin/sh
# Entry of a node container: the node's release store under $ORCH_ROOT_DIR (default /data) with
# the demo service listening on $SERVICE_LISTEN, then the agent, given the agent's flags as
# arguments. A new node installs $INITIAL_PACKAGE; a restarted one boots its permanent release,
# as a machine does after a reboot (its agent then reconciles a release that was only current).
set -eu
ROOT=${ORCH_ROOT_DIR:-/data}
printf 'listen = "%s"\n' "${SERVICE_LISTEN:-0.0.0.0:8080}" > "$ROOT/demo-service.toml"
if [ ! -e "$ROOT/releases/state.json" ]; then
    orchestrator node install --root-dir "$ROOT" \
        --package "${INITIAL_PACKAGE:-/pkgs/ok/demo-service-4.2.0.zip}" >&2
else
    tab=$(printf '\t')
    orchestrator node versions --root-dir "$ROOT" | while IFS="$tab" read -r v state; do
        if [ "$state" = permanent ]; then
            demo-service start --root "$ROOT" --version "${v#\* }" >&2
        fi
    done
fi
exec orchestrator agent --root-dir "$ROOT" "$@"
