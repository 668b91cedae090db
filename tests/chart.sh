#!/usr/bin/env bash
# Tests of the Helm chart charts/kube-lock-manager against the real API server
# of testenv (`eval "$(testenv/testenv env)"` first):
#   - the chart's CRD copies match the generated crds/distributedlocks.yaml and
#     crds/semaphores.yaml
#   - helm lint with the default values and with ci/full-values.yaml
#   - helm template renders what each value set asks for
#   - the values schema (and the template's own checks) reject bad values
#   - the rendered manifests pass a server-side dry run
#   - helm install into a fresh namespace creates every object, with the
#     restricted security settings and the operator's permissions (and no
#     more); helm uninstall removes them but keeps the CRDs
# Without a node (plain testenv) the Deployment never gets Pods: the install is
# checked through the objects here; tests/e2e-chart.sh runs the chart on the
# real node of `testenv up --node` (probes, leader election, grants).
# Prints `chart tests: N passed, 0 failed` last on success; on the first failure
# prints the failing command's output and then one line saying what failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

chart=charts/kube-lock-manager
crd_names=(distributedlocks.lockmanager.dev semaphores.lockmanager.dev)
# crds/<plural>.yaml: the generated CRDs, and their copies in $chart/crds-source/
crd_files=(distributedlocks.yaml semaphores.yaml)
passed=0

if [[ -z "${KUBECONFIG:-}" ]]; then
  echo "chart tests: KUBECONFIG is not set; start the API server with testenv/testenv up and run eval \"\$(testenv/testenv env)\"" >&2
  exit 1
fi
command -v kubectl >/dev/null || { echo "chart tests: kubectl is required" >&2; exit 1; }
helm="$(testenv/build-helm.sh)" || { echo "chart tests: cannot build or find helm (testenv/build-helm.sh)" >&2; exit 1; }

work="$(mktemp -d)"
# A unique release (and so unique cluster-scoped names) and namespace per run.
suffix="$(date +%s)-$RANDOM"
release="klm-chart-$suffix"
ns="klm-chart-$suffix"
namespace_created=0
installed=0

kc() { kubectl --request-timeout=30s "$@"; }

# Puts a CRD back as the other tests expect it: present, owned by no release.
# Only when our release owns it (a CRD of someone else's release stays as it is).
disown_crd() {
  local crd="$1" owner
  owner="$(kc get crd "$crd" -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}' 2>/dev/null)" || return 0
  [[ "$owner" == "$release" ]] || return 0
  kc annotate crd "$crd" meta.helm.sh/release-name- meta.helm.sh/release-namespace- helm.sh/resource-policy- >/dev/null
  kc label crd "$crd" app.kubernetes.io/managed-by- app.kubernetes.io/instance- app.kubernetes.io/name- \
    app.kubernetes.io/component- app.kubernetes.io/version- app.kubernetes.io/part-of- helm.sh/chart- >/dev/null
}

# Deletes the namespace. Plain testenv runs no namespace controller, so after
# checking that the namespace holds none of our objects we finalize it
# ourselves (what that controller does once a namespace is empty).
delete_namespace() {
  kc delete namespace "$ns" --wait=false >/dev/null 2>&1 || return 0
  # With a node (testenv up --node) the controller-manager runs the namespace
  # controller, and the Deployment's Pods exist: finalizing the namespace here
  # would strand them (their volumes' ServiceAccount and ConfigMap gone).
  [[ "${KLM_NODE:-}" != 1 ]] || return 0
  if [[ -z "$(kc get deploy,svc,sa,pdb,cm,secret -n "$ns" -l "app.kubernetes.io/instance=$release" -o name 2>/dev/null)" ]]; then
    printf '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"%s"},"spec":{"finalizers":[]}}' "$ns" |
      kc replace --raw "/api/v1/namespaces/$ns/finalize" -f - >/dev/null 2>&1 || true
  fi
}

cleanup() {
  set +e
  if ((installed)); then
    "$helm" uninstall "$release" -n "$ns" --wait=false >/dev/null 2>&1
    kc delete clusterrole,clusterrolebinding -l "app.kubernetes.io/instance=$release" --ignore-not-found >/dev/null 2>&1
  fi
  for crd in "${crd_names[@]}"; do disown_crd "$crd" >/dev/null 2>&1; done
  if ((namespace_created)); then delete_namespace; fi
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "chart tests: FAILED after $passed passed: $*" >&2
  exit 1
}
pass() {
  passed=$((passed + 1))
  echo "ok $passed - $*"
}

# check "what" CMD...: CMD must succeed; on failure its output, then the reason.
check() {
  local what="$1"
  shift
  if "$@" >"$work/out" 2>&1; then
    pass "$what"
  else
    sed 's/^/    /' "$work/out" >&2
    fail "$what"
  fi
}

# rejects "what" PATTERN VALUES_YAML: helm template must fail with an error
# matching PATTERN (so it fails for the reason we mean, not another).
rejects() {
  local what="$1" pattern="$2" values="$work/bad-values.yaml"
  printf '%s\n' "$3" >"$values"
  if "$helm" template bad "$chart" -f "$values" >"$work/out" 2>&1; then
    fail "values with $what were accepted: $(tr '\n' ' ' <"$values")"
  fi
  if ! grep -Eq -- "$pattern" "$work/out"; then
    sed 's/^/    /' "$work/out" >&2
    fail "values with $what were rejected, but the error does not mention /$pattern/"
  fi
  pass "rejects $what"
}

# expect "what" EXPECTED CMD...: CMD must succeed and print exactly EXPECTED.
expect() {
  local what="$1" expected="$2" actual
  shift 2
  if ! actual="$("$@" 2>"$work/err")"; then
    sed 's/^/    /' "$work/err" >&2
    fail "$what: the command failed: $*"
  fi
  [[ "$actual" == "$expected" ]] || fail "$what: expected '$expected', got '$actual'"
  pass "$what"
}

# not_rendered "what" TEMPLATE VALUES_ARGS...: TEMPLATE renders to nothing.
not_rendered() {
  local what="$1" template="$2"
  shift 2
  if "$helm" template "$release" "$chart" "$@" --show-only "$template" >"$work/out" 2>&1 ||
    ! grep -q "could not find template $template" "$work/out"; then
    sed 's/^/    /' "$work/out" >&2
    fail "$what: $template was rendered (or helm failed for another reason)"
  fi
  pass "$what"
}

# field KIND/NAME JSONPATH: a field of a live object in the test namespace.
field() { kc get -n "$ns" "$1" -o "jsonpath=$2"; }

# rendered VALUES_ARGS... -- TEMPLATE JSONPATH: a field of one rendered object.
rendered() {
  local args=()
  while [[ "$1" != "--" ]]; do args+=("$1"); shift; done
  shift
  "$helm" template "$release" "$chart" -n "$ns" "${args[@]}" --show-only "$1" |
    kc create --dry-run=client -f - -o "jsonpath=$2"
}

# The dashboard ConfigMap with grafanaDashboard.enabled: its label, and the
# title and panel count of the JSON it carries (the metric names it queries
# are checked by a unit test in src/metrics.rs).
dashboard_configmap() {
  local label
  label="$(rendered --set grafanaDashboard.enabled=true -- templates/grafana-dashboard.yaml '{.metadata.labels.grafana_dashboard}')"
  rendered --set grafanaDashboard.enabled=true -- templates/grafana-dashboard.yaml '{.data.kube-lock-manager\.json}' |
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(sys.argv[1], d["uid"], len(d["panels"]))' "$label"
}

# render FILE VALUES_ARGS...: the release's manifests into FILE.
render() {
  local file="$1"
  shift
  "$helm" template "$release" "$chart" -n "$ns" "$@" >"$file"
}

# rendered_crd NAME VALUES_ARGS... -- JSONPATH: a field of the rendered CRD NAME
# (templates/crds.yaml renders one document per CRD).
rendered_crd() {
  local name="$1" args=()
  shift
  while [[ "$1" != "--" ]]; do args+=("$1"); shift; done
  shift
  "$helm" template "$release" "$chart" -n "$ns" "${args[@]}" --show-only templates/crds.yaml |
    awk -v name="$name" '
      /^---/ { if (found) printf "%s", doc; doc = ""; found = 0; next }
      { doc = doc $0 "\n" }
      $0 == "  name: " name { found = 1 }
      END { if (found) printf "%s", doc }' |
    kc create --dry-run=client -f - -o "jsonpath=$1"
}

# can_i VERB RESOURCE: whether the operator's ServiceAccount may (yes or no).
# The API server's RBAC cache may lag a new binding by a moment: asked until the
# answer is EXPECTED (at most 10 s), then printed.
can_i() {
  local expected="$1" answer deadline=$((SECONDS + 10))
  shift
  while :; do
    answer="$(kc auth can-i --as "system:serviceaccount:$ns:$fullname" "$@" 2>/dev/null)" || true
    [[ "$answer" == "$expected" || $SECONDS -ge $deadline ]] && break
    sleep 0.5
  done
  printf '%s\n' "$answer"
}

# first_document FILE: the first YAML document of FILE (the ClusterRole of an example).
first_document() { awk 'NR > 1 && /^---/ {exit} {print}' "$1"; }

# kinds FILE: "Kind/name" of every object in a rendered manifest, sorted.
kinds() {
  awk '/^---/{kind=""} /^kind: /{kind=$2} /^  name: /{if (kind != "") {print kind "/" $2; kind=""}}' "$1" | sort
}

full=(-f "$chart/ci/full-values.yaml")
fullname="$release-kube-lock-manager"

# --- the chart's source files -------------------------------------------------
# Helm cannot read files outside the chart, so the chart carries copies of the CRDs.
for file in "${crd_files[@]}"; do
  if ! diff -u "crds/$file" "$chart/crds-source/$file" >"$work/out" 2>&1; then
    sed 's/^/    /' "$work/out" >&2
    fail "$chart/crds-source/$file differs from crds/$file; refresh it: cp crds/$file $chart/crds-source/"
  fi
  pass "the chart's CRD copy equals crds/$file"
done
check "helm lint (default values)" "$helm" lint --strict "$chart"
check "helm lint (ci/full-values.yaml)" "$helm" lint --strict "$chart" "${full[@]}"

# --- helm template --------------------------------------------------------------
check "helm template (default values)" render "$work/default.yaml"
check "helm template (ci/full-values.yaml)" render "$work/full.yaml" "${full[@]}"

expect "default values render the operator's objects" \
  "$(printf '%s\n' "ClusterRole/$fullname" "ClusterRole/$fullname-lock-waiter" "ClusterRoleBinding/$fullname" \
    "CustomResourceDefinition/${crd_names[0]}" "CustomResourceDefinition/${crd_names[1]}" \
    "Deployment/$fullname" "PodDisruptionBudget/$fullname" \
    "Service/$fullname" "ServiceAccount/$fullname" | sort)" \
  kinds "$work/default.yaml"
expect "ci/full-values.yaml adds the ServiceMonitor and drops the lock-waiter role" \
  "$(printf '%s\n' "ClusterRole/$fullname" "ClusterRoleBinding/$fullname" \
    "CustomResourceDefinition/${crd_names[0]}" "CustomResourceDefinition/${crd_names[1]}" \
    "Deployment/$fullname" "PodDisruptionBudget/$fullname" \
    "Service/$fullname" "ServiceAccount/lock-operator" "ServiceMonitor/$fullname" | sort)" \
  kinds "$work/full.yaml"
# The template rebuilds the CRDs from crds-source/ (to add labels and the keep
# annotation); their specs must come out exactly as generated.
for i in "${!crd_files[@]}"; do
  crd_spec="$(kc create --dry-run=client -f "crds/${crd_files[$i]}" -o 'jsonpath={.spec}')" ||
    fail "kubectl cannot read crds/${crd_files[$i]}"
  expect "the rendered CRD ${crd_names[$i]} has the same spec as crds/${crd_files[$i]}" "$crd_spec" \
    rendered_crd "${crd_names[$i]}" -- '{.spec}'
done
expect "crds.keep=true (default) marks both CRDs helm.sh/resource-policy: keep, with the release's labels" \
  "distributedlocks.lockmanager.dev:keep:$release semaphores.lockmanager.dev:keep:$release " \
  rendered -- templates/crds.yaml '{.metadata.name}:{.metadata.annotations.helm\.sh/resource-policy}:{.metadata.labels.app\.kubernetes\.io/instance} '
expect "crds.keep=false leaves both CRDs to helm uninstall" "distributedlocks.lockmanager.dev: semaphores.lockmanager.dev: " \
  rendered "${full[@]}" -- templates/crds.yaml '{.metadata.name}:{.metadata.annotations.helm\.sh/resource-policy} '
not_rendered "crds.install=false renders no CRD" templates/crds.yaml --set crds.install=false
expect "full values: replicas, image, auth from the Secret, CA from the ConfigMap" \
  "3 registry.example.com/platform/lockctl:0.1.0-rc.1 search-credentials/user search-credentials/pass search-ca/ca.pem /etc/kube-lock-manager/ca/ca.pem" \
  rendered "${full[@]}" -- templates/deployment.yaml \
  '{.spec.replicas} {.spec.template.spec.containers[0].image} {range .spec.template.spec.containers[0].env[?(@.valueFrom.secretKeyRef)]}{.valueFrom.secretKeyRef.name}/{.valueFrom.secretKeyRef.key} {end}{.spec.template.spec.volumes[0].configMap.name}/{.spec.template.spec.volumes[0].configMap.items[0].key} {.spec.template.spec.containers[0].env[?(@.name=="ELASTICSEARCH_CA_CERT")].value}'
expect "full values: operator flags" \
  "operator --es-url=https://search.example.com:9200 --index-prefix=team-locks --es-timeout=5s --http-addr=127.0.0.1:9102 --log-format=text --cluster-scope-namespaces=batch,platform --selector=shard=a --leader-elect --leader-election-name=klm-leader --lease-duration=20s --max-retry-interval=10s" \
  rendered "${full[@]}" -- templates/deployment.yaml '{.spec.template.spec.containers[0].args[*]}'
expect "an API key from the Secret replaces basic auth" "ELASTICSEARCH_API_KEY=creds/api-key;" \
  rendered --set elasticsearch.auth.existingSecret=creds --set elasticsearch.auth.apiKeyKey=api-key -- templates/deployment.yaml \
  '{range .spec.template.spec.containers[0].env[?(@.valueFrom.secretKeyRef)]}{.name}={.valueFrom.secretKeyRef.name}/{.valueFrom.secretKeyRef.key};{end}'
expect "a CA from a Secret is mounted read-only" "tls-ca/ca.crt true /etc/kube-lock-manager/ca/ca.crt" \
  rendered --set elasticsearch.ca.secretName=tls-ca -- templates/deployment.yaml \
  '{.spec.template.spec.volumes[0].secret.secretName}/{.spec.template.spec.volumes[0].secret.items[0].key} {.spec.template.spec.containers[0].volumeMounts[0].readOnly} {.spec.template.spec.containers[0].env[?(@.name=="ELASTICSEARCH_CA_CERT")].value}'
expect "full values: hostNetwork, ClusterFirstWithHostNet, port 9102, probes on 127.0.0.1" \
  "true ClusterFirstWithHostNet http=9102 127.0.0.1:http 127.0.0.1:http" \
  rendered "${full[@]}" -- templates/deployment.yaml \
  '{.spec.template.spec.hostNetwork} {.spec.template.spec.dnsPolicy} {.spec.template.spec.containers[0].ports[0].name}={.spec.template.spec.containers[0].ports[0].containerPort} {.spec.template.spec.containers[0].livenessProbe.httpGet.host}:{.spec.template.spec.containers[0].livenessProbe.httpGet.port} {.spec.template.spec.containers[0].readinessProbe.httpGet.host}:{.spec.template.spec.containers[0].readinessProbe.httpGet.port}'
expect "full values: /tmp emptyDir, extra volume and mount, extra init container and container" \
  "elasticsearch-ca tmp scratch | /etc/kube-lock-manager/ca /tmp /scratch | 16Mi | proxy:Always | operator log-shipper" \
  rendered "${full[@]}" -- templates/deployment.yaml \
  '{.spec.template.spec.volumes[*].name} | {.spec.template.spec.containers[0].volumeMounts[*].mountPath} | {.spec.template.spec.volumes[?(@.name=="tmp")].emptyDir.sizeLimit} | {.spec.template.spec.initContainers[0].name}:{.spec.template.spec.initContainers[0].restartPolicy} | {.spec.template.spec.containers[*].name}'
expect "default values: the Pod network, the cluster's DNS policy, a writable /tmp, probes on the Pod IP" \
  "|||tmp:/tmp|" \
  rendered -- templates/deployment.yaml \
  '{.spec.template.spec.hostNetwork}|{.spec.template.spec.dnsPolicy}|{.spec.template.spec.containers[0].readinessProbe.httpGet.host}|{.spec.template.spec.containers[0].volumeMounts[0].name}:{.spec.template.spec.containers[0].volumeMounts[0].mountPath}|{.spec.template.spec.initContainers}'
expect "hostNetwork: updates replace Pods (maxSurge 0), the node port is never held twice" "RollingUpdate 0 1" \
  rendered --set hostNetwork=true -- templates/deployment.yaml \
  '{.spec.strategy.type} {.spec.strategy.rollingUpdate.maxSurge} {.spec.strategy.rollingUpdate.maxUnavailable}'
expect "updateStrategy overrides it" "Recreate" \
  rendered --set hostNetwork=true --set updateStrategy.type=Recreate -- templates/deployment.yaml '{.spec.strategy.type}'
expect "the Pod network keeps the Kubernetes default strategy" "" \
  rendered -- templates/deployment.yaml '{.spec.strategy}' 
expect "dnsPolicy overrides the hostNetwork default" "true Default" \
  rendered --set hostNetwork=true --set dnsPolicy=Default -- templates/deployment.yaml \
  '{.spec.template.spec.hostNetwork} {.spec.template.spec.dnsPolicy}'
expect "tmpVolume.enabled=false: no volumes, no mounts" "operator --http-addr=0.0.0.0:8080 ||" \
  rendered --set tmpVolume.enabled=false -- templates/deployment.yaml \
  '{.spec.template.spec.containers[0].args[0]} {.spec.template.spec.containers[0].args[?(@=="--http-addr=0.0.0.0:8080")]} |{.spec.template.spec.volumes}|{.spec.template.spec.containers[0].volumeMounts}'
expect "an IPv6 http.address is bracketed" "--http-addr=[::1]:8081" \
  rendered --set http.address=::1 --set http.port=8081 -- templates/deployment.yaml \
  '{.spec.template.spec.containers[0].args[?(@=="--http-addr=[::1]:8081")]}'
not_rendered "no PodDisruptionBudget for a single replica (it would block every drain)" templates/pdb.yaml --set replicaCount=1
not_rendered "no ServiceMonitor by default" templates/servicemonitor.yaml
not_rendered "no Grafana dashboard by default" templates/grafana-dashboard.yaml
expect "grafanaDashboard.enabled: a ConfigMap with the sidecar's label and the dashboard" "1 kube-lock-manager 8" \
  dashboard_configmap

# --- bad values -------------------------------------------------------------------
rejects 'replicaCount: "two"' "replicaCount.*want integer" 'replicaCount: "two"'
rejects "no elasticsearch.url" "missing property 'url'" 'elasticsearch: {url: null}'
rejects "a URL without http(s)://" "/elasticsearch/url" 'elasticsearch: {url: "search:9200"}'
rejects "logFormat: xml" "/logFormat" 'logFormat: xml'
rejects "a misspelt key (replicas)" "additional properties 'replicas'" 'replicas: 3'
rejects "a bad leaseDuration" "/leaderElection/leaseDuration" 'leaderElection: {leaseDuration: "15 seconds"}'
rejects "a CA from both a Secret and a ConfigMap" "secretName or configMapName, not both" \
  'elasticsearch: {ca: {secretName: a, configMapName: b}}'
rejects "http.port 0" "/http/port" 'http: {port: 0}'
rejects "hostNetwork: \"yes\"" "hostNetwork.*want boolean" 'hostNetwork: "yes"'
rejects "an unknown dnsPolicy" "/dnsPolicy" 'dnsPolicy: ClusterLast'
rejects "an extra volume mount without mountPath" "missing property 'mountPath'" 'extraVolumeMounts: [{name: scratch}]'
rejects "an extra container without a name" "missing property 'name'" 'extraContainers: [{image: x}]'
rejects "a misspelt http key (host)" "additional properties 'host'" 'http: {host: 127.0.0.1}'
rejects "a dashboard namespace that is not a name" "/grafanaDashboard/namespace" 'grafanaDashboard: {namespace: "Not A Name"}'
rejects "2 replicas without leader election" "needs leaderElection.enabled=true" \
  'leaderElection: {enabled: false}'

# --- the API server accepts the manifests ----------------------------------------
check "create namespace $ns" kc create namespace "$ns"
namespace_created=1
check "server-side dry run of the default manifests" kc apply --dry-run=server -f "$work/default.yaml"
# The test cluster has no prometheus-operator, so the server cannot know the
# ServiceMonitor kind: the full values are dry-run without it (its rendering is
# checked above).
check "helm template (ci/full-values.yaml, serviceMonitor.enabled=false)" \
  render "$work/full-no-sm.yaml" "${full[@]}" --set serviceMonitor.enabled=false
check "server-side dry run of the ci/full-values.yaml manifests (without the ServiceMonitor)" \
  kc apply --dry-run=server -f "$work/full-no-sm.yaml"

# --- helm install / uninstall ---------------------------------------------------------
# The CRD usually exists already (the Rust tests apply it), without Helm's
# ownership metadata: --take-ownership adopts it, as a user who installed the CRD
# with kubectl first would. The cleanup hands it back (disown_crd).
installed=1
check "helm install $release (--wait=false: testenv runs no kubelet)" \
  "$helm" install "$release" "$chart" -n "$ns" --wait=false --take-ownership
for object in "deployment/$fullname" "serviceaccount/$fullname" "service/$fullname" "poddisruptionbudget/$fullname"; do
  check "$object exists" kc get -n "$ns" "$object"
done
for object in "clusterrole/$fullname" "clusterrolebinding/$fullname" "clusterrole/$fullname-lock-waiter" "${crd_names[@]/#/crd/}"; do
  check "$object exists" kc get "$object"
done
operator_rules="$(first_document examples/rbac/operator.yaml | kc create --dry-run=client -f - -o 'jsonpath={.rules}')" ||
  fail "kubectl cannot read examples/rbac/operator.yaml"
waiter_rules="$(kc create --dry-run=client -f examples/rbac/lock-waiter.yaml -o 'jsonpath={.rules}')" ||
  fail "kubectl cannot read examples/rbac/lock-waiter.yaml"
expect "the ClusterRole has the rules of examples/rbac/operator.yaml" "$operator_rules" \
  kc get "clusterrole/$fullname" -o 'jsonpath={.rules}'
expect "the lock-waiter ClusterRole has the rules of examples/rbac/lock-waiter.yaml" "$waiter_rules" \
  kc get "clusterrole/$fullname-lock-waiter" -o 'jsonpath={.rules}'
expect "the ClusterRoleBinding binds the ServiceAccount" "ClusterRole/$fullname ServiceAccount/$ns/$fullname" \
  kc get "clusterrolebinding/$fullname" -o 'jsonpath={.roleRef.kind}/{.roleRef.name} {.subjects[0].kind}/{.subjects[0].namespace}/{.subjects[0].name}'
# What the operator does with Semaphores, through the chart's ClusterRole: it
# watches them, patches their finalizer and status (server-side apply), and
# nothing else (no update, no delete, no create).
for verb_resource in "list semaphores" "watch semaphores" "patch semaphores" "patch semaphores --subresource=status"; do
  # shellcheck disable=SC2086 # verb and resource (and subresource flag) as separate words
  expect "the operator's ServiceAccount may $verb_resource" "yes" can_i yes $verb_resource -A
done
for verb_resource in "update semaphores" "delete semaphores" "create semaphores" "update semaphores --subresource=status"; do
  # shellcheck disable=SC2086
  expect "the operator's ServiceAccount may not $verb_resource" "no" can_i no $verb_resource -A
done
expect "both CRDs are marked to be kept" "distributedlocks.lockmanager.dev=keep semaphores.lockmanager.dev=keep " \
  kc get "${crd_names[@]/#/crd/}" -o 'jsonpath={range .items[*]}{.metadata.name}={.metadata.annotations.helm\.sh/resource-policy} {end}'
deploy="deployment/$fullname"
expect "2 replicas with leader election" "2 operator --leader-elect" \
  field "$deploy" '{.spec.replicas} {.spec.template.spec.containers[0].args[0]} {.spec.template.spec.containers[0].args[?(@=="--leader-elect")]}'
expect "pod securityContext: runAsNonRoot, runAsUser 65532, seccomp RuntimeDefault" "true 65532 RuntimeDefault" \
  field "$deploy" '{.spec.template.spec.securityContext.runAsNonRoot} {.spec.template.spec.securityContext.runAsUser} {.spec.template.spec.securityContext.seccompProfile.type}'
expect "container securityContext: runAsNonRoot, read-only root, no privilege escalation, drop ALL, seccomp RuntimeDefault" \
  "true true false ALL RuntimeDefault;" \
  field "$deploy" '{range .spec.template.spec.containers[*].securityContext}{.runAsNonRoot} {.readOnlyRootFilesystem} {.allowPrivilegeEscalation} {.capabilities.drop[*]} {.seccompProfile.type};{end}'
expect "POD_NAME and POD_NAMESPACE from the downward API" "metadata.name metadata.namespace" \
  field "$deploy" '{.spec.template.spec.containers[0].env[?(@.name=="POD_NAME")].valueFrom.fieldRef.fieldPath} {.spec.template.spec.containers[0].env[?(@.name=="POD_NAMESPACE")].valueFrom.fieldRef.fieldPath}'
expect "probes: liveness /healthz, readiness /readyz on port http (8080)" "/healthz:http /readyz:http http=8080" \
  field "$deploy" '{.spec.template.spec.containers[0].livenessProbe.httpGet.path}:{.spec.template.spec.containers[0].livenessProbe.httpGet.port} {.spec.template.spec.containers[0].readinessProbe.httpGet.path}:{.spec.template.spec.containers[0].readinessProbe.httpGet.port} {.spec.template.spec.containers[0].ports[0].name}={.spec.template.spec.containers[0].ports[0].containerPort}'
expect "the Service exposes port http 8080 of the operator's Pods" "http 8080 http" \
  field "service/$fullname" '{.spec.ports[0].name} {.spec.ports[0].port} {.spec.ports[0].targetPort}'
expect "the PodDisruptionBudget keeps 1 replica" "1" \
  field "poddisruptionbudget/$fullname" '{.spec.minAvailable}'

check "helm uninstall $release" "$helm" uninstall "$release" -n "$ns" --wait=false
installed=0
expect "uninstall removed the namespaced objects" "" \
  kc get deploy,sa,svc,pdb -n "$ns" -l "app.kubernetes.io/instance=$release" -o name
expect "uninstall removed the ClusterRoles and the ClusterRoleBinding" "" \
  kc get clusterrole,clusterrolebinding -l "app.kubernetes.io/instance=$release" -o name
check "uninstall kept both CRDs (crds.keep=true)" kc get "${crd_names[@]/#/crd/}"

echo "chart tests: $passed passed, 0 failed"
