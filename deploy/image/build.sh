#!/usr/bin/env bash
# Builds the orchestrator container image from this checkout, with nothing but the host's own
# toolchain and Docker Engine (no registry: the image is FROM scratch).
#
#   deploy/image/build.sh                         # cargo build --release; tag orchestrator:latest
#   PROFILE=dev TAG=orchestrator:dev deploy/image/build.sh   # reuse a debug build (tests, CI)
#
# The rootfs holds the two binaries (stripped), the shared libraries ldd lists for them,
# /bin/sh (the host's dash) for hooks and entry scripts, `tc` if present (fault tests), the
# entry scripts of deploy/image/, and an /etc/passwd with root and nobody.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-release}
TAG=${TAG:-orchestrator:latest}
case "$PROFILE" in
    dev | debug) dir=debug; cargo build --bins ;;
    release) dir=release; cargo build --release --bins ;;
    *) dir=$PROFILE; cargo build --profile "$PROFILE" --bins ;;
esac
command -v docker >/dev/null || { echo "docker is not installed" >&2; exit 2; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root"/usr/local/bin "$root"/usr/local/share/orchestrator "$root"/bin "$root"/etc \
    "$root"/tmp "$root"/data "$root"/root
chmod 1777 "$root"/tmp
for b in orchestrator demo-service; do
    cp "${CARGO_TARGET_DIR:-target}/$dir/$b" "$root/usr/local/bin/$b"
    strip "$root/usr/local/bin/$b" 2>/dev/null || true
done
cp "$(readlink -f /bin/sh)" "$root/bin/sh"
bins=("$root/usr/local/bin/orchestrator" "$root/usr/local/bin/demo-service" "$root/bin/sh")
if tc=$(command -v tc); then
    mkdir -p "$root/usr/sbin"
    cp "$tc" "$root/usr/sbin/tc"
    bins+=("$root/usr/sbin/tc")
fi
# Every library the binaries load, at the path the loader looks for it.
for b in "${bins[@]}"; do
    ldd "$b" | awk '/=> \// {print $3} /^[ \t]*\// {print $1}'
done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cp deploy/image/*.sh "$root/usr/local/share/orchestrator/"
chmod 0755 "$root"/usr/local/share/orchestrator/*.sh
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' \
    > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
cp deploy/Dockerfile "$ctx/Dockerfile"
docker build --quiet -t "$TAG" "$ctx" >/dev/null
echo "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)"
