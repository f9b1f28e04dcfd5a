# Sourced by scripts/test and scripts/bench: starts a local Redis Cluster, three masters
# and one replica (of the first master) on free ports, with redis-server and redis-cli
# (REDIS_SERVER and REDIS_CLI override the binaries).
#
# start_redis_cluster CALLER: CALLER names the script in messages. Expects the caller's
# `redis_answers HOST PORT` function and its `cluster_pids` and `temp_dirs` arrays, which
# its exit trap uses to stop the nodes (SIGKILL) and remove their directory. Sets
# REDIS_CLUSTER_URLS (the masters' URLs, comma-separated) and `cluster_master_ports`.
start_redis_cluster() {
  cluster_caller=$1
  cli=${REDIS_CLI:-redis-cli}
  if ! command -v "$cli" >/dev/null 2>&1; then
    echo "$cluster_caller: $cli is not on the PATH (apt-get install redis-tools), and the" >&2
    echo "  (the local Redis Cluster is created with it)." >&2
    exit 1
  fi
  cluster_dir=$(mktemp -d "${TMPDIR:-/tmp}/tower-mesh-cluster.XXXXXX")
  temp_dirs+=("$cluster_dir")

  # A node also listens on its port + 10000 (the cluster bus), so both must be free. The
  # sockets stay bound until all four ports are picked, so that no two picks overlap.
  cluster_ports=$(python3 - <<'EOF'
import socket
held, ports = [], []
for _ in range(1000):
    if len(ports) == 4:
        break
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
    port = s.getsockname()[1]
    if port + 10000 > 65535:
        continue
    bus = socket.socket()
    try:
        bus.bind(("127.0.0.1", port + 10000))
    except OSError:
        bus.close()
        continue
    held.append(bus)
    ports.append(port)
print(*ports)
EOF
  ) || { echo "$cluster_caller: could not pick free ports for the Redis Cluster (python3)" >&2; exit 1; }
  read -r p1 p2 p3 p4 <<<"$cluster_ports"
  [ -n "$p4" ] || { echo "$cluster_caller: found no four free port pairs for the Redis Cluster" >&2; exit 1; }

  # Prints what the nodes and redis-cli said before failing: their directory goes on exit.
  cluster_failed() { # why
    echo "$cluster_caller: the local Redis Cluster did not come up: $1" >&2
    local log
    for log in "$cluster_dir"/*.log "$cluster_dir"/*/redis.log; do
      [ -f "$log" ] || continue
      echo "--- $log (last lines)" >&2
      tail -n 8 "$log" >&2
    done
    exit 1
  }

  for port in "$p1" "$p2" "$p3" "$p4"; do
    mkdir "$cluster_dir/$port"
    # --dir: a replica's initial sync writes an RDB file, which would otherwise land in
    # the working directory. --repl-diskless-sync-delay 0: the first sync would wait 5 s,
    # and a master killed before it leaves a replica that refuses to take over.
    "${REDIS_SERVER:-redis-server}" --cluster-enabled yes \
      --cluster-config-file "$cluster_dir/$port/nodes-$port.conf" --dir "$cluster_dir/$port" \
      --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --cluster-node-timeout 2000 --repl-diskless-sync-delay 0 \
      --logfile "$cluster_dir/$port/redis.log" &
    cluster_pids+=("$!")
  done
  for port in "$p1" "$p2" "$p3" "$p4"; do
    for _ in $(seq 1 100); do redis_answers 127.0.0.1 "$port" && break; sleep 0.05; done
    redis_answers 127.0.0.1 "$port" || cluster_failed "redis-server on port $port did not start"
  done

  # redis-cli waits for the nodes to agree with no deadline of its own.
  timeout 30 "$cli" --cluster create "127.0.0.1:$p1" "127.0.0.1:$p2" "127.0.0.1:$p3" \
    --cluster-replicas 0 --cluster-yes >"$cluster_dir/create.log" 2>&1 ||
    cluster_failed "redis-cli --cluster create failed"
  timeout 30 "$cli" --cluster add-node "127.0.0.1:$p4" "127.0.0.1:$p1" --cluster-slave \
    >"$cluster_dir/add-node.log" 2>&1 ||
    cluster_failed "redis-cli --cluster add-node (the replica) failed"

  # redis-cli returns before every master has heard of the replica, and the replica can
  # take over (the failover tests) only once it has synced with its master. Replies are
  # read whole before matching: `| grep -q` could stop reading early, and redis-cli's
  # SIGPIPE would then fail the pipe under pipefail.
  cluster_up() {
    local port reply replica_line="127\.0\.0\.1:$p4@[^ ]* slave "
    for port in "$p1" "$p2" "$p3"; do
      reply=$("$cli" -p "$port" cluster info 2>/dev/null) || return 1
      [[ "$reply" == *cluster_state:ok* ]] || return 1
      reply=$("$cli" -p "$port" cluster nodes 2>/dev/null) || return 1
      [[ "$reply" =~ $replica_line ]] || return 1
    done
    reply=$("$cli" -p "$p4" info replication 2>/dev/null) || return 1
    [[ "$reply" == *master_link_status:up* ]]
  }
  for _ in $(seq 1 300); do cluster_up && break; sleep 0.1; done
  cluster_up || cluster_failed "no cluster_state:ok with the replica on $p4 synced within 30 s"

  export REDIS_CLUSTER_URLS="redis://127.0.0.1:$p1,redis://127.0.0.1:$p2,redis://127.0.0.1:$p3"
  cluster_master_ports=("$p1" "$p2" "$p3")
}
