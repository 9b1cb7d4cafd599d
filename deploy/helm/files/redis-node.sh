#!/bin/sh
# Starts one Redis Cluster node and, beside it, redis-cluster.sh, which forms the cluster or brings this
# node back into it. Used by compose.yaml and the Helm chart alike; no other job forms or repairs the cluster.
#
# Environment: REDIS_NODES (every node, host:port, the creator first), REDIS_ANNOUNCE_HOSTNAME (default
# the host name), REDIS_PASSWORD (or REDIS_PASSWORD_FILE), REDIS_TLS_DIR, REDIS_APPENDONLY (yes keeps the data set on /data), REDIS_MAXMEMORY,
# CLUSTER_NODE_TIMEOUT_MS, and for placement NODE_NAME and NODE_ZONE (see redis-cluster.sh).
set -eu
here="$(dirname "$0")"
conf=/data/nodes.conf
# Until the server runs, a stop request ends the script; then it is forwarded to the server.
trap 'exit 143' TERM INT
# Readiness is earned again on every start: the node must rejoin before its Service sends it clients.
rm -f /data/cluster-ready

if [ -s "$conf" ]; then
  # Containers and pods get new IPs when they are recreated: the peers' addresses are refreshed from DNS;
  # a peer not resolvable yet keeps its old address and is corrected by gossip once it pings this node.
  awk '$1 != "vars" && NF > 2 {
    split($2, addr, ",")
    lookup = "getent ahostsv4 " addr[2]
    if (addr[2] != "" && (lookup | getline found) > 0) {
      split(found, ip, " ")
      sub(/^[^:]*/, ip[1], $2)
    }
    close(lookup)
  } { print }' "$conf" >"$conf.new"
  mv "$conf.new" "$conf"

  # A primary that restarts without its data set (no AOF, or the AOF lost) would come back serving its
  # slots empty, and its replica would copy the empty set. It starts as a new node instead, once its
  # replica has taken over its slots; redis-cluster.sh then makes it that replica's replica.
  if [ "${REDIS_APPENDONLY:-yes}" != yes ] || ! ls /data/appendonlydir/*.manifest >/dev/null 2>&1; then
    lost="$(awk '$3 ~ /myself/ && $3 ~ /master/ && NF > 8 { print $1 }' "$conf")"
    if [ -n "$lost" ]; then
      echo "redis-node: this primary lost its data set; it rejoins as a new node so its replica keeps the data"
      # When no replica took the slots over, it starts under its old id and serves them empty.
      if sh "$here/redis-cluster.sh" hand-over "$lost"; then
        mv "$conf" "$conf.lost"
      fi
    fi
  fi
fi

# The password reaches the server on its standard input, never on a command line.
[ -z "${REDIS_PASSWORD:-}" ] && [ -n "${REDIS_PASSWORD_FILE:-}" ] && REDIS_PASSWORD="$(cat "$REDIS_PASSWORD_FILE")"
quoted() { printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"]/\\&/g')"; }
if [ -n "${REDIS_PASSWORD:-}" ]; then
  export REDISCLI_AUTH="$REDIS_PASSWORD"
  secrets="requirepass $(quoted "$REDIS_PASSWORD")
masterauth $(quoted "$REDIS_PASSWORD")"
else
  secrets=""
fi

# With REDIS_TLS_DIR (ca.crt, tls.crt, tls.key) clients, replicas and the cluster bus speak TLS only.
if [ -n "${REDIS_TLS_DIR:-}" ]; then
  set -- --port 0 --tls-port 6379 --tls-cert-file "$REDIS_TLS_DIR/tls.crt" --tls-key-file "$REDIS_TLS_DIR/tls.key" \
    --tls-ca-cert-file "$REDIS_TLS_DIR/ca.crt" --tls-auth-clients no --tls-replication yes --tls-cluster yes
else
  set -- --port 6379
fi

# repl-diskless-sync-delay 0: a replica that rejoins (after a failover or a restart) is synced at once
# rather than after 5 s; until it is, sends to its primary's rooms wait for it and are refused.
printf '%s\n' "$secrets" | redis-server - "$@" \
  --bind 0.0.0.0 \
  --protected-mode no \
  --dir /data \
  --cluster-enabled yes \
  --cluster-config-file "$conf" \
  --cluster-node-timeout "${CLUSTER_NODE_TIMEOUT_MS:-5000}" \
  --cluster-announce-hostname "${REDIS_ANNOUNCE_HOSTNAME:-$(hostname)}" \
  --cluster-preferred-endpoint-type hostname \
  --cluster-allow-replica-migration no \
  --appendonly "${REDIS_APPENDONLY:-yes}" \
  --appendfsync everysec \
  --save "" \
  --repl-diskless-sync-delay 0 \
  --maxmemory "${REDIS_MAXMEMORY:-256mb}" \
  --maxmemory-policy noeviction &
server=$!
# Replica placement and orphans are handled by redis-cluster.sh, which knows where each node runs.
trap 'kill -TERM "$server" 2>/dev/null' TERM INT
sh "$here/redis-cluster.sh" keep &
keeper=$!
status=0
# `wait` returns early when a trapped signal arrives; the server's own exit status is the container's.
while kill -0 "$server" 2>/dev/null; do
  status=0
  wait "$server" || status=$?
done
kill "$keeper" 2>/dev/null || true
exit "$status"
