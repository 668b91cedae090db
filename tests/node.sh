#!/usr/bin/env bash
# Smoke check of the test environment's real node (`testenv/testenv up --node`).
# Images are imported, never pulled: every Pod says imagePullPolicy: Never.
#  - a Pod from local/busybox:1 on the pod network runs, gets a bridge address, logs;
#  - a Pod reaches another Pod's address over the node's bridge;
#  - a host-network Pod reaches the API server on 127.0.0.1 and has its projected
#    ServiceAccount token (what in-cluster clients such as `lockctl wait` use);
#  - a Job from the same image completes through the real Job controller;
#  - local/lockctl:<version> runs `--version` as 65532 with a read-only root.
#   eval "$(testenv/testenv up --node)"; tests/node.sh
# shellcheck source=tests/node-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/node-lib.sh"
timeout="${KLM_NODE_TEST_TIMEOUT:-90}"

logs_contain() { local logs; logs="$(kubectl -n "$ns" logs "$1")" && grep -qF -- "$2" <<<"$logs"; }
# exit status 99 stops wait_until at once
succeeded() {
  if [[ "$(kubectl -n "$ns" get pod "$1" -o 'jsonpath={.status.phase}')" == Failed ]]; then
    echo "pod $1 failed: $(kubectl -n "$ns" describe pod "$1" | tail -n 15; kubectl -n "$ns" logs "$1" 2>&1 | tail -n 5)"
    return 99
  fi
  local waiting
  waiting="$(kubectl -n "$ns" get pod "$1" -o 'jsonpath={.status.containerStatuses[*].state.waiting.reason}')"
  if [[ "$waiting" == *Err* || "$waiting" == *BackOff* ]]; then
    echo "pod $1 cannot start: $waiting: $(kubectl -n "$ns" get pod "$1" -o 'jsonpath={.status.containerStatuses[*].state.waiting.message}')"
    return 99
  fi
  jsonpath_is Succeeded "pod/$1" '{.status.phase}'
}

ns="node-smoke-$$"
kubectl create namespace "$ns" >/dev/null
trap 'kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true' EXIT
step "namespace $ns: waiting for its default ServiceAccount (kube-controller-manager)"
wait_until "default ServiceAccount" kubectl -n "$ns" get serviceaccount default

step "a Pod on the pod network"
kubectl -n "$ns" apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: echo}
spec:
  restartPolicy: Never
  containers:
  - name: echo
    image: local/busybox:1
    imagePullPolicy: Never
    command: [sh, -c, 'echo "hello from $(hostname) at $(ip -4 -o addr show eth0 | awk "{print \$4}")"']
YAML
wait_until "pod echo Succeeded" succeeded echo
wait_until "pod echo logs" logs_contain echo "hello from echo at "
pod_ip="$(kubectl -n "$ns" get pod echo -o 'jsonpath={.status.podIP}')"
node_ip="$(kubectl get node "$KLM_NODE_NAME" -o 'jsonpath={.status.addresses[?(@.type=="InternalIP")].address}')"
[[ "${pod_ip%.*}" == "${node_ip%.*}" && "$pod_ip" != "$node_ip" ]] ||
  fail "pod IP $pod_ip is not on the node's bridge subnet ($node_ip)"
echo "    $(kubectl -n "$ns" logs echo) (node $node_ip)"

step "Pod to Pod over the node's bridge"
kubectl -n "$ns" apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: server}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: local/busybox:1
    imagePullPolicy: Never
    command: [sh, -c, 'mkdir -p /tmp/www && echo pong > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www']
YAML
wait_until "pod server Running" jsonpath_is true pod/server '{.status.containerStatuses[0].ready}'
ip="$(kubectl -n "$ns" get pod server -o 'jsonpath={.status.podIP}')"
kubectl -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: Never
  containers:
  - name: wget
    image: local/busybox:1
    imagePullPolicy: Never
    # httpd may still be starting: a few tries, a second apart (no -T: it crashes busybox-static 1.35 wget)
    command: [sh, -c, 'for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O- "http://$ip:8080/" && exit 0; sleep 1; done; exit 1']
YAML
wait_until "pod client Succeeded" succeeded client
wait_until "pod client got the answer" logs_contain client pong
echo "    client got '$(kubectl -n "$ns" logs client)' from $ip:8080"
kubectl -n "$ns" delete pod server --wait=false >/dev/null

step "a host-network Pod authenticates to the API server on 127.0.0.1 with its ServiceAccount token"
kubectl -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: hostnet}
spec:
  restartPolicy: Never
  hostNetwork: true
  containers:
  - name: check
    image: local/busybox:1
    imagePullPolicy: Never
    env:
    - {name: KUBERNETES_SERVICE_HOST, value: "127.0.0.1"}
    - {name: KUBERNETES_SERVICE_PORT, value: "$api_port"}
    command:
    - sh
    - -c
    - |
      set -e
      d=/var/run/secrets/kubernetes.io/serviceaccount
      test -s \$d/token && test -s \$d/ca.crt && grep -qx $ns \$d/namespace
      # who the API server says the Pod's token is (any authenticated user may ask)
      wget -q -O- --no-check-certificate --header "Authorization: Bearer \$(cat \$d/token)" \
        --header "Content-Type: application/json" \
        --post-data '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}' \
        "https://\$KUBERNETES_SERVICE_HOST:\$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1/selfsubjectreviews"
YAML
wait_until "pod hostnet Succeeded" succeeded hostnet
wait_until "pod hostnet logs" logs_contain hostnet "\"system:serviceaccount:$ns:default\""

step "a Job completes through the Job controller"
kubectl -n "$ns" apply -f - >/dev/null <<'YAML'
apiVersion: batch/v1
kind: Job
metadata: {name: work}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: work
        image: local/busybox:1
        imagePullPolicy: Never
        command: [sh, -c, 'echo job-ran']
YAML
job_done() {
  if [[ "$(kubectl -n "$ns" get job work -o 'jsonpath={.status.conditions[?(@.type=="Failed")].status}')" == True ]]; then
    echo "job work failed: $(kubectl -n "$ns" describe job work | tail -n 10)"
    return 99
  fi
  jsonpath_is True job/work '{.status.conditions[?(@.type=="Complete")].status}'
}
wait_until "job work Complete" job_done
wait_until "job work logs" logs_contain job/work job-ran

step "local/lockctl:$version --version as 65532 with a read-only root"
kubectl -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: lockctl}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  containers:
  - name: lockctl
    image: local/lockctl:$version
    imagePullPolicy: Never
    args: [--version]
    securityContext:
      runAsUser: 65532
      runAsGroup: 65532
      runAsNonRoot: true
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
YAML
wait_until "pod lockctl Succeeded" succeeded lockctl
wait_until "pod lockctl logs" logs_contain lockctl "$version"
echo "    $(kubectl -n "$ns" logs lockctl)"
echo "ok: the node runs Pods, host-network Pods, Jobs and the lockctl image"
