#!/bin/sh
# Starts one Redis Cluster node that announces its DNS name (REDIS_ANNOUNCE_HOSTNAME, default the host
# name) to clients. Containers and pods get new IPs when they are recreated, so the peers' addresses in
# nodes.conf are refreshed from DNS first; a peer not resolvable yet keeps its old address and is
# corrected by gossip once it pings this node. Used by compose.yaml and the Helm chart alike.
set -eu
conf=/data/nodes.conf
if [ -s "$conf" ]; then
  awk '$1 != "vars" && NF > 2 {
    split($2, addr, ",")
    lookup = "getent hosts " addr[2]
    if (addr[2] != "" && (lookup | getline found) > 0) {
      split(found, ip, " ")
      sub(/^[^:]*/, ip[1], $2)
    }
    close(lookup)
  } { print }' "$conf" >"$conf.new"
  mv "$conf.new" "$conf"
fi
exec redis-server \
  --port 6379 \
  --bind 0.0.0.0 \
  --protected-mode no \
  --cluster-enabled yes \
  --cluster-config-file "$conf" \
  --cluster-node-timeout "${CLUSTER_NODE_TIMEOUT_MS:-5000}" \
  --cluster-announce-hostname "${REDIS_ANNOUNCE_HOSTNAME:-$(hostname)}" \
  --cluster-preferred-endpoint-type hostname \
  --appendonly no \
  --save "" \
  --maxmemory "${REDIS_MAXMEMORY:-256mb}" \
  --maxmemory-policy noeviction \
  ${REDIS_PASSWORD:+--requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD"}
