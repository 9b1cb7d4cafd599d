#!/usr/bin/env bash
# Builds local stand-ins for the official base images (Python, Redis, HAProxy) from Debian packages,
# for machines that reach no container registry: debootstrap from the mirror the host's apt uses, then
# `docker import`, then one small apt layer per stand-in. docker/local-base-images.env names them.
# Re-running skips every image whose recipe (this file and the host's CA bundle) is unchanged.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=docker/local-base-images.env
source "$here/local-base-images.env"
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
suite="${DEBIAN_SUITE:-$codename}"
ca_bundle="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
recipe="$(cat "$0" "$ca_bundle" | sha256sum | cut -c1-16)"

mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  # The first archive the host's apt fetches the suite from, so no mirror is named here.
  mirror="$(apt-get indextargets --format '$(SITE) $(RELEASE)' 2>/dev/null \
    | awk -v s="$suite" '$2 == s { print $1; exit }')"
fi
[[ -n "$mirror" ]] || { echo "no apt source for '$suite' on this host; set DEBIAN_MIRROR" >&2; exit 2; }

up_to_date() {
  [[ "${FORCE:-0}" != 1 ]] && [[ "$(docker image inspect -f '{{ index .Config.Labels "recipe" }}' "$1" 2>/dev/null)" == "$recipe" ]]
}

build_debian() {
  up_to_date "$DEBIAN_IMAGE" && { echo "$DEBIAN_IMAGE is up to date"; return; }
  command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
  local rootfs
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' RETURN
  echo "debootstrap $suite from $mirror"
  debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" >/dev/null
  echo "deb $mirror $suite main" >"$rootfs/etc/apt/sources.list"
  # Containers reach PyPI only through the host's TLS trust, so the stand-ins carry the host's bundle.
  cp "$ca_bundle" "$rootfs/usr/local/share/ca-certificates/host-bundle.crt"
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    --change "LABEL recipe=$recipe" --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$DEBIAN_IMAGE"
}

# build_standin IMAGE DOCKERFILE-BODY: one apt layer on the Debian stand-in.
build_standin() {
  up_to_date "$1" && { echo "$1 is up to date"; return; }
  printf 'FROM %s\nLABEL recipe=%s\n%s\n' "$DEBIAN_IMAGE" "$recipe" "$2" | docker build -q -t "$1" -
}

apt_install='RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends'
apt_clean='&& rm -rf /var/lib/apt/lists/*'

build_debian
build_standin "$PYTHON_IMAGE" "$apt_install python3 python3-venv python-is-python3 $apt_clean"
build_standin "$REDIS_IMAGE" "$apt_install redis-server $apt_clean && mkdir /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD [\"redis-server\"]"
build_standin "$HAPROXY_IMAGE" "$apt_install haproxy $apt_clean && mkdir -p /usr/local/etc/haproxy
USER haproxy
CMD [\"haproxy\", \"-W\", \"-db\", \"-f\", \"/usr/local/etc/haproxy/haproxy.cfg\"]"
echo "stand-ins ready: $PYTHON_IMAGE $REDIS_IMAGE $HAPROXY_IMAGE"
