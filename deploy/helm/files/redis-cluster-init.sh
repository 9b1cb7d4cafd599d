#!/bin/sh
# One-shot: joins REDIS_NODES into one cluster (one replica per primary) unless they already are one,
# then waits until every node reports cluster_state:ok. Safe on every `docker compose up`.
set -eu
nodes="${REDIS_NODES:?space-separated host:port list}"
deadline=$(( $(date +%s) + ${INIT_TIMEOUT_S:-120} ))
if [ -n "${REDIS_PASSWORD:-}" ]; then export REDISCLI_AUTH="$REDIS_PASSWORD"; fi

cli() { node="$1"; shift; redis-cli -h "${node%:*}" -p "${node##*:}" "$@" | tr -d '\r'; }
info() { cli "$1" cluster info | sed -n "s/^$2://p"; }
wait_for() {
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "redis-cluster-init: timed out waiting for: $*" >&2; exit 1; }
    sleep 1
  done
}
answers() { [ "$(cli "$1" ping 2>/dev/null)" = PONG ]; }
whole() {
  for node in $nodes; do
    [ "$(info "$node" cluster_state)" = ok ] && [ "$(info "$node" cluster_known_nodes)" = "$count" ] || return 1
  done
}

count=$(echo $nodes | wc -w)
for node in $nodes; do wait_for answers "$node"; done
if whole; then echo "redis-cluster-init: cluster of $count nodes already ok"; exit 0; fi

first=${nodes%% *}
if [ "$(info "$first" cluster_known_nodes)" = 1 ] && [ "$(info "$first" cluster_slots_assigned)" = 0 ]; then
  # redis-cli --cluster create wants addresses; the nodes still announce their host names to clients.
  addresses=""
  for node in $nodes; do
    addresses="$addresses $(getent hosts "${node%:*}" | awk '{ print $1; exit }'):${node##*:}"
  done
  redis-cli --cluster create $addresses --cluster-replicas 1 --cluster-yes
fi
wait_for whole
echo "redis-cluster-init: cluster of $count nodes ok"
