# Helpers shared by the end-to-end tests on the real node (tests/e2e-*.sh);
# sourced, not run. Needs `testenv/testenv up --node` and the lockctl image
# imported (scripts/test-node does both).
#   e2e_init NAME          KLM_* env, helm, a fresh namespace $ns, cleanup on exit
#   operator_install REL ARGS...   helm install of the chart with the local image
#   wait_until WHAT CMD...  polls CMD until it succeeds (exit 99 stops at once)
# Every wait is a poll with a deadline (KLM_E2E_TIMEOUT, default 120 s).
# KLM_E2E_LOGS=DIR keeps the operator's log of every release there.
# shellcheck shell=bash
# shellcheck source=tests/node-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/node-lib.sh"
timeout="${KLM_E2E_TIMEOUT:-120}"
es_url="$ELASTICSEARCH_URL" # from `testenv env` (node-lib.sh)
es_port="${es_url##*:}"
helm="$(testenv/build-helm.sh)" || fail "cannot build or find helm (testenv/build-helm.sh)"
chart=charts/kube-lock-manager
crd_name=distributedlocks.lockmanager.dev

# job_finished JOB Complete|Failed: that condition (exit 99 on the other one)
job_finished() {
  local want="$1" job="$2" other=Failed c
  [[ "$want" == Complete ]] || other=Complete
  c="$(kc -n "$ns" get job "$job" -o "jsonpath={.status.conditions[?(@.type==\"$other\")].status}")"
  if [[ "$c" == True ]]; then
    echo "job $job is $other, not $want: $(kc -n "$ns" describe job "$job" | tail -n 8; kc -n "$ns" logs "job/$job" --all-containers 2>&1 | tail -n 5)"
    return 99
  fi
  jsonpath_is True "job/$job" "{.status.conditions[?(@.type==\"$want\")].status}"
}
lock_phase_is() { jsonpath_is "$1" "distributedlock/$2" '{.status.phase}'; }

# e2e_init NAME: namespace $ns (deleted on exit with everything in it), work dir $work.
e2e_init() {
  ns="klm-$1-$$"
  work="$(mktemp -d)"
  release=""
  cleanup_hooks=()
  trap e2e_cleanup EXIT
  kc create namespace "$ns" >/dev/null
  wait_until "default ServiceAccount of $ns" kc -n "$ns" get serviceaccount default
}
e2e_cleanup() {
  local rc=$? h
  set +e
  if ((rc != 0)) && [[ -n "$release" ]]; then
    echo "--- the operator's log (last lines):" >&2
    kc -n "$ns" logs -l "app.kubernetes.io/instance=$release" --all-containers --tail=30 --prefix >&2 2>&1
  fi
  if [[ -n "${KLM_E2E_LOGS:-}" && -n "$release" ]]; then # keep the operator's whole log
    mkdir -p "$KLM_E2E_LOGS"
    kc -n "$ns" logs -l "app.kubernetes.io/instance=$release" -c operator --tail=-1 --prefix >"$KLM_E2E_LOGS/$ns-$release.log" 2>&1
  fi
  # Jobs and Pods first, and the requests while the operator still runs (it
  # releases them and removes its finalizer), then the operator, then the
  # namespace (the controller-manager's namespace controller removes the rest).
  kc -n "$ns" delete cronjobs,jobs --all --cascade=background --wait=false >/dev/null 2>&1
  kc -n "$ns" delete pods --all --grace-period=1 --wait=false >/dev/null 2>&1
  kc -n "$ns" delete distributedlocks --all --timeout=20s >/dev/null 2>&1
  [[ -z "$release" ]] || operator_uninstall
  for h in "${cleanup_hooks[@]}"; do eval "$h"; done
  kc delete namespace "$ns" --wait=false >/dev/null 2>&1
  rm -rf "$work"
}

# A free TCP port on 127.0.0.1 (for the operator's HTTP server on the host network).
free_port() {
  local p
  for p in $(shuf -i 20000-29999 -n 50); do
    ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && { echo "$p"; return; }
  done
  fail "no free port"
}

# operator_install RELEASE HELM_ARGS...: the chart with the local image, the search
# node of testenv and the in-cluster API address of this environment; its own
# lock index prefix (so runs never share grants). Does not wait.
operator_install() {
  release="$1"
  shift
  index_prefix="klm-e2e-$$-$RANDOM"
  # The CRD: adopted from whoever applied it (as tests/chart.sh does), kept on uninstall.
  "$helm" install "$release" "$chart" -n "$ns" --take-ownership --wait=false \
    --set image.repository=local/lockctl --set "image.tag=$version" --set image.pullPolicy=Never \
    --set "elasticsearch.url=$es_url" --set "elasticsearch.indexPrefix=$index_prefix" \
    --set logFormat=text --set leaderElection.leaseDuration=6s \
    --set "extraEnv[0].name=KUBERNETES_SERVICE_HOST" --set-string "extraEnv[0].value=127.0.0.1" \
    --set "extraEnv[1].name=KUBERNETES_SERVICE_PORT" --set-string "extraEnv[1].value=$api_port" \
    "$@" >/dev/null || fail "helm install $release"
  fullname="$release-kube-lock-manager"
}
operator_uninstall() {
  "$helm" uninstall "$release" -n "$ns" --wait=false >/dev/null 2>&1
  kc delete clusterrole,clusterrolebinding -l "app.kubernetes.io/instance=$release" --ignore-not-found >/dev/null 2>&1
  # hand the CRD back: present, owned by no release (what the other tests expect)
  local owner
  owner="$(kc get crd "$crd_name" -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}' 2>/dev/null)" || owner=""
  if [[ "$owner" == "$release" ]]; then
    kc annotate crd "$crd_name" meta.helm.sh/release-name- meta.helm.sh/release-namespace- helm.sh/resource-policy- >/dev/null 2>&1
    kc label crd "$crd_name" app.kubernetes.io/managed-by- app.kubernetes.io/instance- app.kubernetes.io/name- \
      app.kubernetes.io/component- app.kubernetes.io/version- app.kubernetes.io/part-of- helm.sh/chart- >/dev/null 2>&1
  fi
  release=""
}
# The host-network form: one replica per node (its HTTP port is a node port),
# listening on 127.0.0.1 only, probed there by the kubelet.
operator_install_hostnet() {
  local rel="$1"
  shift
  http_port="$(free_port)"
  operator_install "$rel" --set replicaCount=1 --set hostNetwork=true \
    --set http.address=127.0.0.1 --set "http.port=$http_port" --set http.probeHost=127.0.0.1 "$@"
}
# ready_replicas N: the Deployment's Pods pass the real readiness probe.
ready_replicas() { jsonpath_is "$1" "deployment/$fullname" '{.status.readyReplicas}'; }
operator_pods() { kc -n "$ns" get pods -l "app.kubernetes.io/instance=$release" -o 'jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}'; }
lease_holder() { kc -n "$ns" get lease "$fullname" -o 'jsonpath={.spec.holderIdentity}'; }

# make_lock NAME LOCK_ID [EXTRA_SPEC_YAML]
make_lock() {
  kc -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: lockmanager.dev/v1alpha1
kind: DistributedLock
metadata: {name: $1}
spec:
  lockId: $2
  ttl: 30s
${3:-}
YAML
}
