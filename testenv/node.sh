# shellcheck shell=bash
# The node of `testenv up --node`: containerd + runc + CNI bridge, a real kubelet,
# kube-controller-manager and kube-scheduler. Sourced by testenv/testenv, which
# defines $run, $api_port, $K8S_VERSION, log, die, pid_alive, claim_port, stop_one.
#
# What keeps the shared machine untouched:
# - containerd, its shims, runc, the CNI plugins and the kubelet run in a private
#   mount namespace (held by `node-ns`), where /run is a tmpfs of its own, /var/lib
#   and /var/log are directories under $run/node, and the /proc/sys files the kubelet
#   or the bridge plugin write are files under $run/node/sysctl;
# - the bridge is ours, pods get no default route and no NAT (ipMasq false): a pod
#   can reach the bridge's subnet only, and host-network pods 127.0.0.1;
# - containers live in a cgroup of our own (cgroupRoot /klm-<apiserver port>);
# - `down` kills what runs in that namespace and cgroup (by pid), deletes the bridge
#   and cgroups, and checks the host's sysctls are as `up` found them.
#
# Pods and the services (the gotchas):
# - the API server listens on 127.0.0.1 only and there is no kube-proxy: a Pod that
#   talks to it uses hostNetwork: true and sets KUBERNETES_SERVICE_HOST=127.0.0.1,
#   KUBERNETES_SERVICE_PORT=$KLM_APISERVER_PORT (its serving certificate names
#   127.0.0.1, and kube-root-ca.crt is the CA that signed it); the search node is
#   http://127.0.0.1:$KLM_ES_PORT from such a Pod. The Service IP 10.96.0.1 leads nowhere.
# - a host-network Pod's IP is the node IP (the bridge's address): probes go there, so
#   an httpGet probe of a host-network Pod needs `host: 127.0.0.1` (or a listener on it).
# - images are imported (testenv/images.sh), never pulled: use imagePullPolicy: Never
#   (or IfNotPresent with a non-latest tag); a pull fails at once on a dead loopback proxy.
# - pods get no DNS (resolvConf ""), hence the harmless MissingClusterDNS events.

node_dir="$run/node"
node_name="${KLM_NODE_NAME:-testenv-node}"
kubelet_port=$((api_port + 2))
kubelet_healthz_port=$((api_port + 3))
kcm_port=$((api_port + 4))
scheduler_port=$((api_port + 5))
node_bridge="klm$api_port"
node_subnet_prefix="${KLM_NODE_SUBNET_PREFIX:-10.213.$((api_port % 251))}" # 16443 → 116, 17443 → 124
node_ip="$node_subnet_prefix.1"
node_cgroup="/klm-$api_port"
containerd_sock="$run/containerd/containerd.sock"
# the host settings the kubelet (vm.*, kernel.*) or the bridge plugin (ip_forward) write
node_sysctls=(vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward)
node_services=(node-ns containerd kubelet kube-controller-manager kube-scheduler)
# where these programs write by default: none may appear on the host (ours are under $run)
node_host_paths=(/var/lib/kubelet /var/lib/containerd /var/lib/cni /var/log/pods /var/log/containers
  /etc/cni /opt/containerd /run/containerd /run/netns /usr/libexec/kubernetes /etc/kubernetes)
existing_host_paths() { local p; for p in "${node_host_paths[@]}"; do [[ -e "$p" ]] && echo "$p"; done; true; }

node_enabled() { [[ -f "$run/node.enabled" ]]; }

build_node() {
  "$here/node-deps.sh"
  NODE_BIN="$("$here/build-k8s.sh" node)"
}

issue_cert() { # dir name subject extensions
  (
    cd "$1"
    openssl ecparam -name prime256v1 -genkey -noout -out "$2.key.sec1" 2>/dev/null
    openssl pkcs8 -topk8 -nocrypt -in "$2.key.sec1" -out "$2.key"
    rm -f "$2.key.sec1"
    openssl req -new -key "$2.key" -subj "$3" -out "$2.csr" 2>/dev/null
    printf '%s\n' "$4" >"$2.ext"
    openssl x509 -req -in "$2.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 \
      -extfile "$2.ext" -out "$2.crt" 2>/dev/null
    rm -f "$2.csr" "$2.ext"
  )
}

make_node_certs() {
  local d="$run/pki" client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  [[ -f "$d/kube-scheduler.crt" ]] && return 0
  log "creating the node's certificates in $d"
  issue_cert "$d" kubelet "/CN=$node_name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$node_name,IP:127.0.0.1,IP:$node_ip"
  issue_cert "$d" kubelet-client "/O=system:nodes/CN=system:node:$node_name" "$client"
  issue_cert "$d" apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  issue_cert "$d" kube-controller-manager "/CN=system:kube-controller-manager" "$client"
  issue_cert "$d" kube-scheduler "/CN=system:kube-scheduler" "$client"
}

write_component_kubeconfig() { # name cert
  local d="$run/pki"
  cat >"$node_dir/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $d/ca.crt
users:
- name: $1
  user:
    client-certificate: $d/$2.crt
    client-key: $d/$2.key
contexts:
- name: testenv
  context: {cluster: testenv, user: $1}
current-context: testenv
EOF
}

# The apiserver's extra flags with a node: the ServiceAccount admission plugin
# (tokens in Pods), the Node authorizer for the kubelet, and how it reaches the
# kubelet: by the node's Hostname, which its own /etc/hosts maps to 127.0.0.1.
apiserver_node_flags() {
  local d="$run/pki"
  echo --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
  echo --kubelet-preferred-address-types Hostname
  echo --kubelet-client-certificate "$d/apiserver-kubelet-client.crt" --kubelet-client-key "$d/apiserver-kubelet-client.key"
  echo --kubelet-certificate-authority "$d/ca.crt"
}
# The command prefix that runs the apiserver in a private mount namespace with our /etc/hosts.
apiserver_node_wrap() {
  printf '127.0.0.1 localhost %s\n::1 localhost\n' "$node_name" >"$node_dir/apiserver-hosts"
  # shellcheck disable=SC2016
  apiserver_wrap=(unshare -m --propagation private -- sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$node_dir/apiserver-hosts")
}

read_sysctls() { local s; for s in "${node_sysctls[@]}"; do echo "$s=$(cat "/proc/sys/$s")"; done; }

node_prepare_host() {
  mkdir -p "$node_dir"/{sysctl,var-lib,var-log,kubelet,cni/net.d,cni/ipam,volume-plugins} "$run/containerd"
  # what the host looked like before: `down` checks it is the same again
  [[ -f "$node_dir/host-sysctls" ]] || read_sysctls >"$node_dir/host-sysctls"
  [[ -f "$node_dir/host-paths" ]] || existing_host_paths >"$node_dir/host-paths"
  local s
  for s in "${node_sysctls[@]}"; do
    [[ -f "$node_dir/sysctl/${s//\//.}" ]] || cat "/proc/sys/$s" >"$node_dir/sysctl/${s//\//.}"
  done
  # our bridge, with the node's address (the kubelet refuses a loopback node IP)
  if ! ip link show "$node_bridge" >/dev/null 2>&1; then
    if grep -q "^$node_subnet_prefix\." <<<"$(ip -4 route show)"; then
      die "$node_subnet_prefix.0/24 is already routed on this host; set KLM_NODE_SUBNET_PREFIX (e.g. 10.214.1)"
    fi
    ip link add "$node_bridge" type bridge
    ip addr add "$node_ip/24" dev "$node_bridge"
    ip link set "$node_bridge" up
  fi
  # our cgroup in each v1 hierarchy (cpuset needs cpus and mems before use)
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -f "$h/cgroup.procs" ]] || continue
    mkdir -p "$h${node_cgroup#/}"
    if [[ -f "$h/cpuset.cpus" ]]; then
      cat "$h/cpuset.cpus" >"$h${node_cgroup#/}/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h${node_cgroup#/}/cpuset.mems"
    fi
  done
  cat >"$node_dir/cni/net.d/10-testenv.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "testenv",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$node_bridge",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$node_dir/cni/ipam",
        "ranges": [[{"subnet": "$node_subnet_prefix.0/24", "rangeStart": "$node_subnet_prefix.10", "rangeEnd": "$node_subnet_prefix.250"}]]
      }
    }
  ]
}
EOF
}

# The private mount namespace, held by a sleeping process.
start_node_ns() {
  pid_alive "$run/node-ns.pid" && return 0
  local binds=() s
  for s in "${node_sysctls[@]}"; do binds+=("$node_dir/sysctl/${s//\//.}" "/proc/sys/$s"); done
  binds+=("$node_dir/var-lib" /var/lib "$node_dir/var-log" /var/log)
  rm -f "$node_dir/ns-ready"
  setsid unshare -m --propagation private -- bash -c '
    set -e
    ready="$1"; shift
    mount -t tmpfs -o mode=755 tmpfs /run
    while (($#)); do mount --bind "$1" "$2"; shift 2; done
    touch "$ready"
    exec sleep 2147483647' node-ns "$node_dir/ns-ready" "${binds[@]}" \
    </dev/null >"$run/node-ns.log" 2>&1 &
  echo $! >"$run/node-ns.pid"
  local deadline=$((SECONDS + 10))
  until [[ -f "$node_dir/ns-ready" ]]; do
    pid_alive "$run/node-ns.pid" || die "the node's mount namespace failed: $(cat "$run/node-ns.log")"
    ((SECONDS < deadline)) || die "the node's mount namespace did not come up"
    sleep 0.05
  done
}
in_node_ns() { nsenter -t "$(cat "$run/node-ns.pid")" -m -- "$@"; }

start_containerd() {
  pid_alive "$run/containerd.pid" && return 0
  local c="$run/containerd"
  mkdir -p "$c/root" "$c/state"
  cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$containerd_sock"
[ttrpc]
  address = "$containerd_sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/local/pause:1"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni/net.d"
    max_conf_num = 1
EOF
  log "starting containerd ($(containerd --version | awk '{print $3}')) on $containerd_sock"
  # Images are imported, never pulled: a pull (a Pod without imagePullPolicy: Never
  # whose image is missing) goes to a proxy on 127.0.0.1:9 that is not there, so it
  # fails at once and never resolves or reaches a registry.
  setsid env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 no_proxy= \
    nsenter -t "$(cat "$run/node-ns.pid")" -m -- containerd --config "$c/config.toml" \
    </dev/null >"$run/containerd.log" 2>&1 &
  echo $! >"$run/containerd.pid"
}
containerd_ready() { ctr --address "$containerd_sock" version >/dev/null 2>&1; }

start_kubelet() {
  pid_alive "$run/kubelet.pid" && return 0
  claim_port "$kubelet_port" kubelet "$run/kubelet.pid"
  claim_port "$kubelet_healthz_port" "kubelet healthz" "$run/kubelet.pid"
  local d="$run/pki"
  cat >"$node_dir/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
tlsCertFile: $d/kubelet.crt
tlsPrivateKeyFile: $d/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $d/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$containerd_sock
cgroupDriver: cgroupfs
cgroupRoot: $node_cgroup
cgroupsPerQOS: true
failSwapOn: false
failCgroupV1: false
makeIPTablesUtilChains: false
resolvConf: ""
volumePluginDir: $node_dir/volume-plugins
# never garbage-collect the imported images (they cannot be pulled) nor evict on a full disk:
# absolute floors, not percentages (1% of a 252 GB volume is 2.5 GB — a CI build on a nearly
# full disk tainted the node with DiskPressure and its Pods stayed Pending)
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "100Mi", nodefs.inodesFree: "1%", imagefs.available: "100Mi"}
serializeImagePulls: false
EOF
  log "starting kubelet $K8S_VERSION as node $node_name ($node_ip), API on 127.0.0.1:$kubelet_port"
  setsid nsenter -t "$(cat "$run/node-ns.pid")" -m -- "$NODE_BIN/kubelet" \
    --config "$node_dir/kubelet-config.yaml" --kubeconfig "$node_dir/kubelet.kubeconfig" \
    --root-dir "$node_dir/kubelet" --hostname-override "$node_name" --node-ip "$node_ip" \
    </dev/null >"$run/kubelet.log" 2>&1 &
  echo $! >"$run/kubelet.pid"
}

start_controller_manager() {
  pid_alive "$run/kube-controller-manager.pid" && return 0
  claim_port "$kcm_port" kube-controller-manager "$run/kube-controller-manager.pid"
  local d="$run/pki" k="$node_dir/kube-controller-manager.kubeconfig"
  log "starting kube-controller-manager on 127.0.0.1:$kcm_port"
  setsid "$NODE_BIN/kube-controller-manager" --kubeconfig "$k" \
    --authentication-kubeconfig "$k" --authorization-kubeconfig "$k" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$node_dir/kcm-certs" \
    --leader-elect=false --controllers '*' --use-service-account-credentials \
    --service-account-private-key-file "$d/sa.key" --root-ca-file "$d/ca.crt" \
    --cluster-signing-cert-file "$d/ca.crt" --cluster-signing-key-file "$d/ca.key" \
    --cluster-name testenv --flex-volume-plugin-dir "$node_dir/volume-plugins" \
    </dev/null >"$run/kube-controller-manager.log" 2>&1 &
  echo $! >"$run/kube-controller-manager.pid"
}

start_scheduler() {
  pid_alive "$run/kube-scheduler.pid" && return 0
  claim_port "$scheduler_port" kube-scheduler "$run/kube-scheduler.pid"
  local k="$node_dir/kube-scheduler.kubeconfig"
  log "starting kube-scheduler on 127.0.0.1:$scheduler_port"
  setsid "$NODE_BIN/kube-scheduler" --kubeconfig "$k" \
    --authentication-kubeconfig "$k" --authorization-kubeconfig "$k" \
    --bind-address 127.0.0.1 --secure-port "$scheduler_port" --cert-dir "$node_dir/scheduler-certs" \
    --leader-elect=false \
    </dev/null >"$run/kube-scheduler.log" 2>&1 &
  echo $! >"$run/kube-scheduler.pid"
}

kctl() { kubectl --kubeconfig "$run/kubeconfig" "$@"; }
node_ready() {
  [[ "$(kctl get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}
default_sa_ready() { kctl -n default get serviceaccount default && kctl -n default get configmap kube-root-ca.crt; }
healthz() { curl -skf "https://127.0.0.1:$1/healthz" | grep -qx ok; }
kubelet_healthz() { [[ "$(curl -sf "http://127.0.0.1:$kubelet_healthz_port/healthz")" == ok ]]; }

# Phase 1, before the apiserver is ready: host preparation, namespace, containerd, images.
node_up_early() {
  node_prepare_host
  start_node_ns
  start_containerd
  wait_service containerd "$run/containerd.pid" containerd_ready
  KLM_RUN_DIR="$run" "$here/images.sh" all >&2
}

# Phase 2, with the apiserver ready: kubelet, controller-manager, scheduler; waits for Ready.
node_up_late() {
  write_component_kubeconfig kubelet kubelet-client
  write_component_kubeconfig kube-controller-manager kube-controller-manager
  write_component_kubeconfig kube-scheduler kube-scheduler
  start_kubelet
  start_controller_manager
  start_scheduler
  wait_service kube-controller-manager "$run/kube-controller-manager.pid" healthz "$kcm_port"
  wait_service kube-scheduler "$run/kube-scheduler.pid" healthz "$scheduler_port"
  wait_service kubelet "$run/kubelet.pid" kubelet_healthz
  log "waiting for node $node_name to be Ready"
  wait_service kubelet "$run/kubelet.pid" node_ready
  wait_service kube-controller-manager "$run/kube-controller-manager.pid" default_sa_ready
}

# pids of the processes in the node's mount namespace or in its cgroup (all ours)
node_pids() {
  local holder ns p
  if pid_alive "$run/node-ns.pid"; then
    holder="$(cat "$run/node-ns.pid")"
    ns="$(readlink "/proc/$holder/ns/mnt")"
    # a reused pid of a host process shares the host's mount namespace: never
    # take every host process for the node's
    if [[ "$ns" == "$(readlink /proc/1/ns/mnt)" || "$ns" == "$(readlink /proc/self/ns/mnt)" ]]; then
      ns=""
    fi
    [[ -n "$ns" ]] && for p in /proc/[0-9]*; do
      [[ "$(readlink "$p/ns/mnt" 2>/dev/null)" == "$ns" && "${p#/proc/}" != "$holder" ]] && echo "${p#/proc/}"
    done
  fi
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -d "$h${node_cgroup#/}" ]] || continue
    find "$h${node_cgroup#/}" -name cgroup.procs -exec cat {} + 2>/dev/null
  done
  true
}

node_down() {
  stop_one kube-scheduler
  stop_one kube-controller-manager
  stop_one kubelet
  if pid_alive "$run/containerd.pid" && containerd_ready; then
    local t
    for t in $(ctr --address "$containerd_sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$containerd_sock" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
    done
  fi
  stop_one containerd
  # whatever is left (shims, container processes): ours by namespace or cgroup
  local pids deadline=$((SECONDS + 20))
  while pids="$(node_pids | sort -u | tr '\n' ' ')"; [[ -n "${pids// /}" ]]; do
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    ((SECONDS < deadline)) || { log "warning: processes still running: $pids"; break; }
    sleep 0.2
  done
  stop_one node-ns # the mounts and the pods' network namespaces go with it
  if ip link show "$node_bridge" >/dev/null 2>&1; then
    deadline=$((SECONDS + 10))
    # the pods' veths vanish with their network namespaces
    while [[ -n "$(ip -o link show master "$node_bridge" 2>/dev/null)" ]] && ((SECONDS < deadline)); do sleep 0.2; done
    ip link del "$node_bridge"
  fi
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -d "$h${node_cgroup#/}" ]] || continue
    find "$h${node_cgroup#/}" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  node_check_clean
  rm -rf "$run/containerd" "$node_dir" "$run/node.enabled"
}

# Says whether the host is as `up` found it; fails if not.
node_check_clean() {
  local bad=0 h
  if [[ -f "$node_dir/host-sysctls" ]]; then
    if ! diff <(read_sysctls) "$node_dir/host-sysctls" >/dev/null; then
      log "error: host sysctls differ from before the node started:"
      diff <(read_sysctls) "$node_dir/host-sysctls" >&2 || true
      bad=1
    fi
  fi
  if [[ -f "$node_dir/host-paths" ]] && ! diff <(existing_host_paths) "$node_dir/host-paths" >/dev/null; then
    log "error: paths appeared on the host: $(comm -23 <(existing_host_paths) "$node_dir/host-paths" | tr '\n' ' ')"
    bad=1
  fi
  if grep -qF "$run" /proc/self/mountinfo; then log "error: mounts under $run remain"; bad=1; fi
  if ip link show "$node_bridge" >/dev/null 2>&1; then log "error: bridge $node_bridge remains"; bad=1; fi
  for h in /sys/fs/cgroup/*/; do
    [[ -d "$h${node_cgroup#/}" ]] && { log "error: cgroup $h${node_cgroup#/} remains"; bad=1; }
  done
  if [[ -d /run/netns && -n "$(ls /run/netns)" ]]; then log "note: /run/netns has entries (not ours: ours lived in a private /run)"; fi
  ((bad == 0)) && log "node stopped; host sysctls, mounts, bridge, cgroups and default state paths are as before"
  ((bad == 0))
}

node_status() {
  local s rc=0
  for s in "${node_services[@]}"; do
    if pid_alive "$run/$s.pid"; then echo "$s: running (pid $(cat "$run/$s.pid"))"; else echo "$s: stopped"; rc=1; fi
  done
  if ((rc == 0)); then
    echo "node $node_name: $(node_ready && echo Ready || echo NotReady) ($node_ip on bridge $node_bridge)"
  fi
  return $rc
}
