# Holds the namespaces of one test node and tears the node down when its stdin closes: when the
# test process drops the node, exits, or is killed. Started by mesh_test_support::node with
#   bash -c "$(this)" supervise NETNS CGROUP DIR API_PORT
# It prints "holder PID" once the holder (a process in the node's network namespace and in a
# mount namespace of its own) is up; the harness starts every node process inside both with
# `nsenter -t PID -m -n`. Mounts made there (container root filesystems, volumes, the pods'
# network namespace pins) never reach the host's mount table and vanish with the last process.
set -u
ns="$1" cg="$2" dir="$3" api_port="$4"
# Ctrl-C reaches the whole process group: the node's processes die of it, but this script must
# live on to clean up after them.
trap '' INT

controllers() { find /sys/fs/cgroup -mindepth 1 -maxdepth 1 -type d; }

teardown() {
  kill "$forwarder" 2>/dev/null
  # Every process in the node's network namespace (node daemons, container shims, the holder)
  # and every container process (they live in the pods' namespaces, under the node's cgroups).
  for _ in $(seq 100); do
    pids="$(ip netns pids "$ns" 2>/dev/null) $(find "/sys/fs/cgroup/pids/$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)"
    pids="$(echo $pids)"
    [ -z "$pids" ] && break
    kill -9 $pids 2>/dev/null
    sleep 0.1
  done
  for c in $(controllers); do
    [ -d "$c/$cg" ] && find "$c/$cg" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  ip netns del "$ns" 2>/dev/null
  if [ -z "${MESH_NODE_KEEP_DIR:-}" ]; then rm -rf "$dir"; else echo "kept $dir" >&2; fi
}

ip netns add "$ns" || exit 1
ip -n "$ns" link set lo up
# The node's address lives on one end of a veth pair whose both ends stay in the namespace (this
# kernel has no dummy links): kubelet, apiserver and kube-proxy need a non-loopback address, and
# the default route through it lets ClusterIP traffic from the node reach kube-proxy's DNAT.
ip -n "$ns" link add node0 type veth peer name node0-peer
ip -n "$ns" addr add "$NODE_CIDR" dev node0
ip -n "$ns" link set node0 up
ip -n "$ns" link set node0-peer up
ip -n "$ns" route add default dev node0
ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1

for c in $(controllers); do mkdir -p "$c/$cg"; done
# A new cpuset cgroup starts with no CPUs or memory nodes; copy its parent's.
cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset/$cg/cpuset.cpus" 2>/dev/null
cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset/$cg/cpuset.mems" 2>/dev/null

nsenter --net="/run/netns/$ns" unshare --mount --propagation slave sleep infinity &
holder=$!
# Paths the kubelet and containerd use whatever they are told: inside the node's mount namespace
# they are the node's own directories.
for p in /var/lib/kubelet /var/log/pods /var/log/containers /run/containerd; do
  mkdir -p "$dir/host$p" "$p"
  for _ in $(seq 50); do
    nsenter -t "$holder" -m -- mount --bind "$dir/host$p" "$p" 2>/dev/null && break
    sleep 0.1
  done
done

# The apiserver listens inside the namespace; the test process reaches it on loopback.
socat "TCP-LISTEN:$api_port,bind=127.0.0.1,reuseaddr,fork" \
  "EXEC:nsenter --net=/run/netns/$ns socat STDIO TCP\\:127.0.0.1\\:6443" &
forwarder=$!

echo "holder $holder"
read -r _
teardown
