#!/usr/bin/env bash
# `make images`: builds the chat and loadtest images. BASE_IMAGES=official uses the official base images,
# BASE_IMAGES=local builds Debian stand-ins for them (docker/build-base-images.sh), and the default
# BASE_IMAGES=auto takes the official ones when they are present or can be pulled. The choice is kept in
# .run/compose.env, the env file that make up/down and the Docker tests hand to docker compose.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .run
choice="${BASE_IMAGES:-auto}"
official="$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)"
if [[ "$choice" == auto ]]; then
  if docker image inspect "$official" >/dev/null 2>&1 || timeout 60 docker pull -q "$official" >/dev/null 2>&1; then
    choice=official
  else
    echo "no registry reachable for $official: building local stand-ins"
    choice=local
  fi
fi
case "$choice" in
  official) : >.run/compose.env ;;
  local) docker/build-base-images.sh && cp docker/local-base-images.env .run/compose.env ;;
  *) echo "BASE_IMAGES must be auto, official or local, not '$choice'" >&2; exit 2 ;;
esac
docker compose --env-file .run/compose.env --profile loadtest build --quiet
echo "images built from $choice base images"
