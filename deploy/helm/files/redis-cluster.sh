#!/bin/sh
# Keeps one node in the Redis Cluster: `keep` runs beside the server (redis-node.sh starts it) and
# `ready` is the node's readiness check. Every REPAIR_INTERVAL_S seconds `keep` applies these rules:
# - A node alone joins the cluster its peers are in. When every peer answers and none is in a cluster,
#   the first node of REDIS_NODES creates it, with the first half of the nodes as primaries.
# - A member primary that serves no slots (it just joined, or lost its data) becomes the replica of the
#   primary that runs farthest from it (another NODE_NAME, and another NODE_ZONE where set), and of
#   those the one with the fewest replicas.
# - A replica moves when a primary runs farther from it than its own; a primary left without a replica
#   takes one from a primary that has two. A replica whose primary came back empty under a new id
#   takes over its slots.
# - The old id of a node that came back under a new id is forgotten by every node.
# Placement travels in the cluster itself: one key per node, all in one slot, read with one MGET.
set -u
self="${REDIS_ANNOUNCE_HOSTNAME:-$(hostname)}"
hosts="$(echo "${REDIS_NODES:?host:port of every node, the creator first}" | tr ',' ' ' | sed 's/:[0-9]*//g')"
placement="$(echo "${NODE_NAME:-} ${NODE_ZONE:-}" | sed 's/^ *$//')"
placement_prefix="{redis-cluster}:placement:"
[ -z "${REDIS_PASSWORD:-}" ] && [ -n "${REDIS_PASSWORD_FILE:-}" ] && REDIS_PASSWORD="$(cat "$REDIS_PASSWORD_FILE")"
[ -n "${REDIS_PASSWORD:-}" ] && export REDISCLI_AUTH="$REDIS_PASSWORD"

log() { echo "redis-cluster: $*"; }
tls="${REDIS_TLS_DIR:+--tls --cacert $REDIS_TLS_DIR/ca.crt}"
cli() { cli_host="$1"; shift; timeout 5 redis-cli $tls -h "$cli_host" -p 6379 "$@" 2>/dev/null | tr -d '\r'; }
info() { cli "$1" cluster info | sed -n "s/^$2://p"; }
alone() { [ "$(info "$1" cluster_known_nodes)" = 1 ] && [ "$(info "$1" cluster_slots_assigned)" = 0 ]; }
address() { getent ahostsv4 "$1" | awk '{ print $1; exit }'; }
# True when this node holds a role: a primary serving slots or a replica.
member() { cli 127.0.0.1 cluster nodes | awk '$3 ~ /myself/ && ($3 ~ /slave/ || NF > 8) { f = 1 } END { exit !f }'; }

join_or_create() {
  for host in $hosts; do
    [ "$host" = "$self" ] && continue
    if [ -n "$(info "$host" cluster_known_nodes)" ] && ! alone "$host"; then
      cli 127.0.0.1 cluster meet "$(address "$host")" 6379 >/dev/null && log "met the cluster through $host"
      return
    fi
  done
  [ "$self" = "${hosts%% *}" ] || return
  for host in $hosts; do
    alone "$host" || return  # a peer that does not answer yet, or one already in a cluster: wait
  done
  count=$(echo $hosts | wc -w)
  primaries=""
  for host in $(echo $hosts | cut -d' ' -f1-$((count / 2))); do
    primaries="$primaries $(address "$host"):6379"
  done
  log "creating the cluster with primaries$primaries; the other nodes join as replicas"
  timeout 60 redis-cli $tls --cluster create $primaries --cluster-replicas 0 --cluster-yes
}

# The node id this node should replicate, or nothing: MODE is adopt (a primary without slots) or
# rebalance (a replica). Reads CLUSTER NODES on stdin; PLACES holds "host<TAB>placement" lines.
choose() {
  awk -v mode="$1" -v places="$2" -v self="$self" -v here="$placement" '
    # 2 when two nodes share neither host nor zone, 1 when they share one of them, 0 when both.
    function score(a, b,  x, y) {
      split(at[host[a]], x, " "); split(at[host[b]], y, " ")
      return !(x[1] != "" && x[1] == y[1]) + !(x[2] != "" && x[2] == y[2])
    }
    BEGIN { n = split(places, lines, "\n"); for (i = 1; i <= n; i++) { split(lines[i], kv, "\t"); at[kv[1]] = kv[2] }; at[self] = here }
    {
      split($2, addr, ","); host[$1] = addr[2]; healthy = $3 !~ /fail|noaddr|handshake/
      if ($3 ~ /myself/) { me = $1; mine = $4 }
      if ($3 ~ /master/ && NF > 8 && healthy) { primary[$1] = 1; replicas[$1] += 0 }
      if ($3 ~ /slave/ && healthy) { replicas[$4]++; of[$1] = $4 }
    }
    # The primary that runs farthest from this node, and of those the one with the fewest replicas.
    function best(skip,  id, pick) {
      pick = ""
      for (id in primary) {
        if (id == skip) continue
        # A node whose placement is not published yet is not known to be far: a replica does not move to it.
        if (mode == "rebalance" && here != "" && at[host[id]] == "") continue
        if (pick == "" || score(me, id) > score(me, pick) || (score(me, id) == score(me, pick) && replicas[id] < replicas[pick])) pick = id
      }
      return pick
    }
    END {
      if (mode == "adopt") { print best(""); exit }
      # A replica stays with a primary in trouble: it is the one that takes over.
      if (!(mine in primary)) exit
      if (here != "" && at[host[mine]] == "") exit
      target = best(mine)
      if (target != "" && score(me, target) > score(me, mine)) { print target; exit }
      # A primary without replica takes the lowest-id replica of a primary with two that runs no
      # closer to it than to its present primary.
      if (replicas[mine] < 2) exit
      for (id in primary) if (replicas[id] == 0 && (orphan == "" || id < orphan)) orphan = id
      if (orphan == "") exit
      for (id in of) if (of[id] == mine && score(id, orphan) >= score(id, mine) && (mover == "" || id < mover)) mover = id
      if (mover == me) print orphan
    }'
}

# Publishes where this node runs, in the cluster itself.
publish_placement() {
  [ -z "$placement" ] || cli 127.0.0.1 -c set "$placement_prefix$self" "$placement" >/dev/null
}

# Where every node runs, as "host<TAB>placement" lines (one MGET: the keys share a slot).
placements() {
  [ -n "$placement" ] || return 0
  keys=""
  for host in $hosts; do keys="$keys $placement_prefix$host"; done
  i=0
  cli 127.0.0.1 -c mget $keys | while IFS= read -r value; do
    i=$((i + 1))
    printf '%s\t%s\n' "$(echo $hosts | cut -d' ' -f$i)" "$value"
  done
}

forget_dead() {
  echo "$1" | awk '
    { split($2, addr, ","); host[$1] = addr[2] }
    $3 ~ /fail[^?]|fail$|noaddr/ && NF <= 8 { dead[$1] = addr[2] }
    $3 !~ /fail|noaddr|handshake/ { live[addr[2]] = $1 }
    END { for (id in dead) if (dead[id] in live) print id }' | while read -r id; do
    log "forgetting $id: its host name answers with another id now"
    for host in $(echo "$1" | awk '$3 !~ /fail|noaddr|handshake/ { split($2, a, ","); print a[2] }'); do
      [ "$host" = "$self" ] && host=127.0.0.1
      cli "$host" cluster forget "$id" >/dev/null
    done
  done
}

# Run by redis-node.sh before a primary that lost its data starts again as a new node: its replica
# takes over OLD_ID's slots while nothing answers at this address yet. A server answering there would
# be the replica's old master address coming back empty, and the replica would resynchronise from it
# and lose the data. Fails when OLD_ID has no replica or none took over within HANDOVER_TIMEOUT_S: the node
# then starts under OLD_ID and serves its slots empty, rather than leave them served by nobody.
hand_over() {
  old="$1"
  deadline=$(( $(date +%s) + ${HANDOVER_TIMEOUT_S:-60} ))
  replica=""
  while [ -z "$replica" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "no peer answered: $old is not handed over"; return 1; }
    for host in $hosts; do
      [ "$host" = "$self" ] && continue
      table="$(cli "$host" cluster nodes)"
      [ -n "$table" ] || continue
      if ! echo "$table" | awk -v id="$old" '$1 == id && NF > 8 { f = 1 } END { exit !f }'; then
        log "$old serves no slots any more"
        return 0
      fi
      replica="$(echo "$table" | awk -v id="$old" '$4 == id && $3 ~ /slave/ && $3 !~ /fail|noaddr/ { split($2, a, ","); print a[2]; exit }')"
      [ -n "$replica" ] || { log "$old has no replica: its slots come back empty"; return 1; }
      break
    done
    [ -n "$replica" ] || sleep 1
  done
  # FORCE needs the other primaries' votes; TAKEOVER, tried after 10 s, needs none.
  mode=force
  asked=$(date +%s)
  log "asking $replica to take over the slots of $old ($mode)"
  cli "$replica" cluster failover "$mode" >/dev/null
  while [ "$(cli "$replica" role | head -n 1)" != master ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "$replica did not take over: $old is not handed over"; return 1; }
    if [ "$mode" = force ] && [ $(( $(date +%s) - asked )) -ge 10 ]; then
      mode=takeover
      log "asking $replica to take over the slots of $old ($mode)"
      cli "$replica" cluster failover "$mode" >/dev/null
    fi
    sleep 0.5
  done
  log "$replica serves the slots of $old now"
}

step() {
  if alone 127.0.0.1; then join_or_create; return; fi
  table="$(cli 127.0.0.1 cluster nodes)"
  [ -n "$table" ] || return
  forget_dead "$table"
  publish_placement
  mode=""
  echo "$table" | awk '$3 ~ /myself/ && $3 ~ /master/ && NF <= 8 { f = 1 } END { exit !f }' && mode=adopt
  echo "$table" | grep -q 'myself,slave' && mode=rebalance
  [ -n "$mode" ] || return 0
  # Redis fails over a primary it cannot reach, but not one whose address now answers with another id
  # (it restarted empty as a new node): nothing pings a node without an address, so it never fails.
  if [ "$mode" = rebalance ] && echo "$table" | awk -v id="$(echo "$table" | awk '$3 ~ /myself/ { print $4 }')" '
      { split($2, addr, ","); host[$1] = addr[2] }
      $1 == id && $3 ~ /noaddr/ && NF > 8 { lost = 1 }
      $1 != id && $3 !~ /fail|noaddr|handshake/ { live[addr[2]] = 1 }
      END { exit !(lost && host[id] in live) }'; then
    log "my primary lost its address to a new node: taking over its slots"
    cli 127.0.0.1 cluster failover force
    return
  fi
  target="$(echo "$table" | choose "$mode" "$(placements)")"
  if [ -n "$target" ]; then
    log "replicating $target ($mode)"
    cli 127.0.0.1 cluster replicate "$target"
  fi
}

case "${1:-}" in
  keep)
    until [ "$(cli 127.0.0.1 ping)" = PONG ]; do sleep 1; done
    while :; do
      step
      sleep "${REPAIR_INTERVAL_S:-5}"
    done
    ;;
  hand-over)
    hand_over "${2:?the node id that lost its data}"
    ;;
  ready)
    # Ready once this node has been a member of a whole cluster: later trouble elsewhere in the cluster
    # (a primary failing over) must not take every node out of its Service at once.
    [ "$(cli 127.0.0.1 ping)" = PONG ] || exit 1
    [ -e /data/cluster-ready ] && exit 0
    [ "$(info 127.0.0.1 cluster_state)" = ok ] && member && touch /data/cluster-ready
    ;;
  *)
    echo "usage: $0 keep|ready|hand-over ID" >&2
    exit 2
    ;;
esac
