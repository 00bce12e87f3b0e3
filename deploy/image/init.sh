#!/bin/sh
# One-shot setup of the compose cluster (deploy/compose.yaml), on shared volumes: the mutual-TLS
# certificates of every party and the demo service's packages. Re-running it changes nothing
# that exists.
set -eu
CERTS=${CERTS:-/certs}
PKGS=${PKGS:-/pkgs}
NODES=${NODES:-n1,n2,n3,n4}
COORDINATORS=${COORDINATORS:-3}
if [ ! -e "$CERTS/ca/ca.pem" ]; then
    orchestrator certs init "$CERTS" --coordinators "$COORDINATORS" --agents "$NODES" \
        --operators admin --viewers dashboard
fi
for v in ${VERSIONS:-4.2.0 4.2.1 4.2.2}; do
    [ -e "$PKGS/ok/demo-service-$v.zip" ] || orchestrator demo package "$v" --out "$PKGS/ok"
done
[ -e "$PKGS/broken/demo-service-4.2.3.zip" ] ||
    orchestrator demo package 4.2.3 --out "$PKGS/broken" --broken
echo "init: certificates in $CERTS, packages in $PKGS"
