#!/usr/bin/env bash
# A base image equal in content to debian:bookworm-slim, made from Debian's archive with debootstrap:
# for build machines that reach the Debian archive but no container registry. Root, debootstrap and
# podman (or docker) needed; about a minute.
#   bash docker/debian-base.sh                      # -> localhost/debian:bookworm-slim
#   podman build --build-arg BASE_IMAGE=localhost/debian:bookworm-slim -f docker/Dockerfile.cpu ...
set -euo pipefail
TAG="${1:-localhost/debian:bookworm-slim}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ENGINE="${ENGINE:-$(command -v podman || command -v docker || true)}"

die() {
  printf 'debian-base.sh: error: %s\n' "$*" >&2
  exit 2
}
[[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[[ -n "$ENGINE" ]] || die "neither podman nor docker is installed"

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
# the sources of the official image: the release, its updates and the security archive
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: ${MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$ENGINE" import --change 'CMD ["bash"]' - "$TAG"
echo "debian-base.sh: built $TAG"
