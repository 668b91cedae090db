#!/usr/bin/env bash
# The chart, for real, on the node of `testenv/testenv up --node`:
#  1. helm install with the local image on the host network (one replica per
#     node, HTTP on 127.0.0.1, probed there): Ready through the real /readyz
#     probe, holds the leader Lease, grants and hands a lock on, using only the
#     chart's RBAC (nothing granted by the test; no "forbidden" in its log); a
#     second host-network replica on the same node is refused by the scheduler
#     (its port is a node port): the documented one-per-node shape.
#  2. Two replicas as Pods on the Pod network, the API server and the search node
#     reached through tests/e2e-relay.sh (loopback → unix socket → loopback):
#     both Ready, one leader; the leader Pod deleted → the other takes the Lease,
#     reports leader=1 and serves grants.
#   eval "$(testenv/testenv env)"; tests/e2e-chart.sh
# shellcheck source=tests/e2e-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"
e2e_init e2e-chart

http_get() { curl -fsS --max-time 3 "$1"; }
holder_is() { local h; h="$(lease_holder)"; [[ "$h" == "$1" ]] || { echo "Lease holder: '$h'"; return 1; }; }
granted_token() { # lock → its fencing token once Granted
  local p
  p="$(kc -n "$ns" get distributedlock "$1" -o 'jsonpath={.status.phase}/{.status.fencingToken}')"
  [[ "$p" == Granted/* && -n "${p#Granted/}" ]] || { echo "lock $1: $p"; return 1; }
}

# --- 1. the host-network form ------------------------------------------------------
step "helm install (host network, 1 replica, HTTP on 127.0.0.1, local/lockctl:$version)"
t0=$SECONDS
operator_install_hostnet klm-e2e-hostnet
wait_until "the operator Ready (readiness probe on 127.0.0.1:$http_port/readyz)" ready_replicas 1
pod="$(operator_pods)"
echo "    $pod Ready after $((SECONDS - t0)) s"
[[ "$(kc -n "$ns" get pod "$pod" -o 'jsonpath={.spec.hostNetwork} {.spec.containers[0].readinessProbe.httpGet.host}:{.spec.containers[0].readinessProbe.httpGet.port} {.spec.serviceAccountName}')" == "true 127.0.0.1:http $fullname" ]] ||
  fail "the Pod is not what the chart should make: $(kc -n "$ns" get pod "$pod" -o yaml | head -n 60)"
wait_until "the Lease held by $pod" holder_is "$pod"
[[ "$(http_get "http://127.0.0.1:$http_port/readyz")" == ok ]] || fail "/readyz"
wait_until "metric leader 1" bash -c "curl -fsS --max-time 3 http://127.0.0.1:$http_port/metrics | grep -Eq '^lockmanager_leader 1'"

step "grants through the chart's operator, with the chart's RBAC only"
make_lock first shared
wait_until "lock first Granted" granted_token first
make_lock second shared
wait_until "lock second waits behind first" jsonpath_is Pending/1 distributedlock/second '{.status.phase}/{.status.waitingPosition}' 
t1="$(kc -n "$ns" get distributedlock first -o 'jsonpath={.status.fencingToken}')"
kc -n "$ns" delete distributedlock first --timeout=30s >/dev/null || fail "deleting lock first (the operator releases and removes its finalizer)"
wait_until "lock second Granted after first was deleted" granted_token second
t2="$(kc -n "$ns" get distributedlock second -o 'jsonpath={.status.fencingToken}')"
((t2 > t1)) || fail "fencing tokens do not increase: first $t1, second $t2"
echo "    first: fencing $t1, then second: fencing $t2"
wait_until "a Granted event (events.k8s.io)" bash -c "kubectl -n $ns get events.events.k8s.io -o 'jsonpath={.items[*].reason}' | grep -qw Granted"
logs="$(kc -n "$ns" logs "$pod")"
if grep -qi forbidden <<<"$logs"; then fail "the operator was refused something by RBAC: $(grep -i forbidden <<<"$logs" | head -n 3)"; fi
subjects="$(kc get clusterrolebinding -o json | jq -r --arg sa "$fullname" --arg ns "$ns" \
  '[.items[] | select(any(.subjects[]?; .kind == "ServiceAccount" and .name == $sa and .namespace == $ns)) | .metadata.name] | join(" ")')"
[[ "$subjects" == "$fullname" ]] || fail "the ServiceAccount is bound by more than the chart's ClusterRoleBinding: $subjects"
[[ -z "$(kc -n "$ns" get rolebindings -o name)" ]] || fail "unexpected RoleBindings in $ns"

step "a second host-network replica on the same node: refused by the scheduler (node port $http_port taken)"
kc -n "$ns" scale "deployment/$fullname" --replicas=2 >/dev/null
unschedulable() {
  local msg
  msg="$(kc -n "$ns" get pods -l "app.kubernetes.io/instance=$release" -o 'jsonpath={range .items[*]}{.status.conditions[?(@.type=="PodScheduled")].message}{end}')"
  grep -q "free ports" <<<"$msg" || { echo "no Pod unschedulable for its port yet: '$msg'"; return 1; }
  echo "$msg"
}
wait_until "the second replica unschedulable" unschedulable
echo "    $(unschedulable | head -c 160)"
kc -n "$ns" scale "deployment/$fullname" --replicas=1 >/dev/null
kc -n "$ns" delete distributedlock second --timeout=30s >/dev/null || fail "deleting lock second"
operator_uninstall
wait_until "the host-network operator Pod gone" jsonpath_is "" pods '{.items[*].metadata.name}' 

# --- 2. two replicas on the Pod network -------------------------------------------------
step "two replicas on the Pod network (API server and search node through the loopback relay)"
relay_dir="$KLM_RUN_DIR/e2e-relay-$$"
cleanup_hooks+=("tests/e2e-relay.sh stop '$relay_dir'")
tests/e2e-relay.sh start "$relay_dir" "api=$api_port" "es=$es_port"
socat_image="$(tests/e2e-relay.sh image)"
cat >"$work/relay-values.yaml" <<YAML
replicaCount: 2
extraVolumes:
  - name: relay
    hostPath: {path: "$relay_dir", type: Directory}
# native sidecars (started before the operator, stopped after it)
extraInitContainers:
$(for np in "api=$api_port" "es=$es_port"; do cat <<ONE
  - name: relay-${np%%=*}
    image: $socat_image
    imagePullPolicy: Never
    restartPolicy: Always
    args: ["TCP-LISTEN:${np#*=},bind=127.0.0.1,fork,reuseaddr", "UNIX-CONNECT:/relay/${np%%=*}.sock"]
    volumeMounts: [{name: relay, mountPath: /relay, readOnly: true}]
    securityContext:
      runAsNonRoot: true
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
    resources: {requests: {cpu: 5m, memory: 8Mi}}
ONE
done)
YAML
t0=$SECONDS
operator_install klm-e2e-ha -f "$work/relay-values.yaml"
wait_until "both replicas Ready (readiness probe on the Pod IP)" ready_replicas 2
echo "    2 replicas Ready after $((SECONDS - t0)) s"
leader_metric() { # pod → its "leader" gauge, read from the Pod's IP on the node's bridge
  local ip
  ip="$(kc -n "$ns" get pod "$1" -o 'jsonpath={.status.podIP}')"
  curl -fsS --max-time 3 "http://$ip:8080/metrics" | sed -nE 's/^lockmanager_leader ([01])$/\1/p'
}
one_leader() {
  local holder p pods n=0 l
  holder="$(lease_holder)"
  pods="$(operator_pods)"
  [[ "$(wc -l <<<"$pods")" == 2 ]] || { echo "pods: $pods"; return 1; }
  grep -qx -- "$holder" <<<"$pods" || { echo "Lease holder '$holder' is not one of $pods"; return 1; }
  for p in $pods; do
    l="$(leader_metric "$p")"
    if [[ "$p" == "$holder" ]]; then [[ "$l" == 1 ]] || { echo "$p holds the Lease, leader=$l"; return 1; }
    else [[ "$l" == 0 ]] || { echo "$p stands by, leader=$l"; return 1; }; fi
    n=$((n + 1))
  done
  echo "$holder"
}
wait_until "one leader (the Lease holder, leader=1; the other leader=0)" one_leader
leader="$(one_leader)"
standby="$(operator_pods | grep -vx -- "$leader")"
echo "    leader $leader, standby $standby"
make_lock ha-1 ha
wait_until "lock ha-1 Granted" granted_token ha-1
make_lock ha-2 ha

step "delete the leader Pod $leader → another replica leads and grants continue"
t0=$SECONDS
kc -n "$ns" delete pod "$leader" --wait=false >/dev/null
# the standby, or the replacement Pod if it starts first: any replica but the deleted one
held_by_another() {
  local h
  h="$(lease_holder)"
  [[ -n "$h" && "$h" != "$leader" ]] && kc -n "$ns" get pod "$h" >/dev/null 2>&1 || { echo "Lease holder: '$h'"; return 1; }
}
wait_until "the Lease taken over by another replica" held_by_another
standby="$(lease_holder)"
echo "    $standby holds the Lease $((SECONDS - t0)) s after the delete"
pod_ready() {
  [[ "$(kc -n "$ns" get pod "$1" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" == True ]] ||
    { echo "pod $1 is not Ready"; return 1; }
}
wait_until "$standby Ready" pod_ready "$standby"
leader_is() { local l; l="$(leader_metric "$2")"; [[ "$l" == "$1" ]] || { echo "$2: leader=$l"; return 1; }; }
wait_until "$standby reports leader=1" leader_is 1 "$standby"
[[ "$(curl -fsS --max-time 3 "http://$(kc -n "$ns" get pod "$standby" -o 'jsonpath={.status.podIP}'):8080/readyz")" == ok ]] || fail "/readyz of the new leader"
h1="$(kc -n "$ns" get distributedlock ha-1 -o 'jsonpath={.status.fencingToken}')"
kc -n "$ns" delete distributedlock ha-1 --timeout=30s >/dev/null || fail "deleting lock ha-1 under the new leader"
wait_until "lock ha-2 Granted by the new leader" granted_token ha-2
h2="$(kc -n "$ns" get distributedlock ha-2 -o 'jsonpath={.status.fencingToken}')"
((h2 > h1)) || fail "fencing tokens do not increase across the failover: $h1, then $h2"
make_lock ha-3 ha-other
wait_until "a new lock ha-3 Granted by the new leader" granted_token ha-3
wait_until "the Deployment back at 2 Ready replicas" ready_replicas 2
wait_until "one leader after the replacement Pod joined" one_leader
echo "    ha-1 fencing $h1 → ha-2 fencing $h2 after the failover; leader $(one_leader)"
logs="$(kc -n "$ns" logs -l "app.kubernetes.io/instance=$release" -c operator --tail=-1)"
if grep -qi forbidden <<<"$logs"; then fail "RBAC refused the operator something: $(grep -i forbidden <<<"$logs" | head -n 3)"; fi
echo "ok: the chart runs on the node: probes, RBAC, one leader, failover, grants"
