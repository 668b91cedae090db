#!/usr/bin/env bash
# Jobs, for real, on the node of `testenv/testenv up --node`, with the operator
# installed from the chart (host network, one replica): the real Job and CronJob
# controllers create the Pods and mark the Jobs Complete or Failed; nothing here
# patches a status.
#  - examples/jobs/*.yaml as written, image names substituted (local/lockctl,
#    local/busybox) and, for Pods that call the API server (`lockctl wait`), the
#    in-cluster address of this environment (host network, KUBERNETES_SERVICE_HOST/
#    PORT = 127.0.0.1:<apiserver>; a real cluster needs neither); the CronJob's
#    schedule every minute and its work 3 s instead of 30 s;
#  - mutual exclusion: 6 Jobs for one lock, 3 init-container and 3 suspend-gated,
#    interleaved; each Pod appends start, end (host /proc/uptime) and its fencing
#    token to a hostPath file; no two intervals overlap, tokens increase in grant
#    order, every Job completes;
#  - a Job whose Pod fails: the lock is released and the next Job served;
#  - a Pod deleted mid-run: its Job fails, the lock is released, the next served;
#  - a gated Job deleted mid-run (its request goes with it): the lock stays with
#    its Pod through the Pod's grace period, then the next Job runs.
#   eval "$(testenv/testenv env)"; tests/e2e-jobs.sh
# shellcheck source=tests/e2e-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"
e2e_init e2e-jobs
t_start=$SECONDS

lockctl_image="local/lockctl:$version"
busybox_image="local/busybox:1"
record_dir="$KLM_RUN_DIR/e2e-jobs-$$"
mkdir -p "$record_dir"
cleanup_hooks+=("rm -rf '$record_dir'")
records="$record_dir/records"
: >"$records"

# What the examples need here and nowhere else: the images of this environment,
# the test namespace, the chart's lock-waiter ClusterRole; Pods that call the API
# server run on the host network with its loopback address (no kube-proxy here).
substitute() {
  sed -e "s|ghcr.io/kube-lock-manager/lockctl:[0-9A-Za-z.-]*|$lockctl_image|" \
    -e "s|image: busybox:1.36|image: $busybox_image|" \
    -e "s|namespace: lock-demo|namespace: $ns|" \
    -e "s|^  name: lock-waiter$|  name: $fullname-lock-waiter|" "$@"
}
in_cluster() { # YAML on stdin → JSON with the in-cluster API address for Pods with init containers
  kc -n "$ns" create --dry-run=client -o json -f - | jq --arg port "$api_port" '
    def pod: if (.initContainers // []) | length > 0 then
        .hostNetwork = true | .dnsPolicy = "ClusterFirstWithHostNet"
        | (.initContainers[], .containers[]) .env += [{name: "KUBERNETES_SERVICE_HOST", value: "127.0.0.1"},
                                                     {name: "KUBERNETES_SERVICE_PORT", value: $port}]
      else . end;
    def obj: if .kind == "Job" then .spec.template.spec |= pod
      elif .kind == "CronJob" then .spec.jobTemplate.spec.template.spec |= pod else . end;
    if .kind == "List" then .items[] |= obj else obj end'
}
apply() { in_cluster | kc -n "$ns" apply -f - >/dev/null; }

step "the operator from the chart (host network, 1 replica)"
operator_install_hostnet klm-e2e-jobs
wait_until "the operator Ready" ready_replicas 1

# --- the examples ------------------------------------------------------------------------
step "examples/jobs/cronjob.yaml (every minute) and a manual run of it, started first: they take a minute"
substitute examples/jobs/cronjob.yaml | sed -e 's|schedule: "\*/5 \* \* \* \*"|schedule: "* * * * *"|' -e 's|sleep 30|sleep 3|' | apply
grep -q 'schedule: "\*/5' examples/jobs/cronjob.yaml || fail "examples/jobs/cronjob.yaml changed its schedule: update the substitution"
kc -n "$ns" create job compact-manual --from=cronjob/compact-index >/dev/null
cron_created=$SECONDS

step "examples/jobs/init-container.yaml"
substitute examples/jobs/init-container.yaml | apply
step "examples/jobs/suspend-gated.yaml"
substitute examples/jobs/suspend-gated.yaml | apply

# --- mutual exclusion, failure, deletion: Jobs written like the examples ---------------
# work SECONDS EXIT TOKEN_EXPR: the main container's script
work() {
  cat <<SH
t=\$($2); s=\$(cut -d' ' -f1 /proc/uptime); echo "START \$JOB \$s \$t" >>/record/records; echo "start \$s token \$t"
sleep $1; e=\$(cut -d' ' -f1 /proc/uptime); echo "END \$JOB \$e \$t" >>/record/records; echo "end \$e"; exit $3
SH
}
# init_job NAME LOCK_ID SECONDS EXIT: the init-container form (examples/jobs/init-container.yaml)
init_job() {
  cat <<YAML
apiVersion: lockmanager.dev/v1alpha1
kind: DistributedLock
metadata: {name: $1}
spec:
  lockId: $2
  ttl: 1m
  holderRef: {kind: Job, name: $1}
---
apiVersion: batch/v1
kind: Job
metadata: {name: $1}
spec:
  backoffLimit: 0
  template:
    spec:
      serviceAccountName: reindexer
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      volumes:
        - {name: lock, emptyDir: {}}
        - {name: record, hostPath: {path: "$record_dir", type: Directory}}
      initContainers:
        - name: wait-for-lock
          image: $lockctl_image
          args: ["wait", "$1", "--timeout", "5m", "--token-file", "/lock/token"]
          volumeMounts: [{name: lock, mountPath: /lock}]
      containers:
        - name: work
          image: $busybox_image
          env: [{name: JOB, value: $1}]
          command: ["sh", "-c", $(work "$3" "cat /lock/fencing-token" "$4" | jq -Rsa .)]
          volumeMounts: [{name: lock, mountPath: /lock, readOnly: true}, {name: record, mountPath: /record}]
YAML
}
# gated_job NAME LOCK_ID SECONDS EXIT: the suspend-gated form (examples/jobs/suspend-gated.yaml)
gated_job() {
  cat <<YAML
apiVersion: batch/v1
kind: Job
metadata:
  name: $1
  annotations: {lockmanager.dev/lock: $2, lockmanager.dev/ttl: 1m}
spec:
  suspend: true
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 1
      volumes: [{name: record, hostPath: {path: "$record_dir", type: Directory}}]
      containers:
        - name: work
          image: $busybox_image
          env:
            - {name: JOB, value: $1}
            - name: FENCING_TOKEN
              valueFrom: {fieldRef: {fieldPath: "metadata.annotations['lockmanager.dev/fencing-token']"}}
          command: ["sh", "-c", $(work "$3" 'echo $FENCING_TOKEN' "$4" | jq -Rsa .)]
          volumeMounts: [{name: record, mountPath: /record}]
YAML
}
step "6 Jobs for lock 'mutex' (init-container and suspend-gated, interleaved), 2 s of work each"
mutex_jobs=(mx-1 mx-2 mx-3 mx-4 mx-5 mx-6)
for i in 0 2 4; do
  init_job "${mutex_jobs[i]}" mutex 2 0 | apply
  gated_job "${mutex_jobs[i + 1]}" mutex 2 0 | apply
done
step "lock 'fail': a Job whose Pod exits 1, then a Job waiting for it"
init_job fail-1 fail 1 1 | apply
gated_job fail-2 fail 1 0 | apply
step "lock 'del': a Job whose Pod is deleted mid-run, then a Job waiting for it"
gated_job del-1 del 600 0 | apply
init_job del-2 del 1 0 | apply
step "lock 'jobdel': a gated Job deleted while its Pod still works through its grace period"
# its Pod keeps working 6 s after SIGTERM (grace 30 s): the lock must stay with it
gated_job jd-1 jobdel 600 0 | kc -n "$ns" create --dry-run=client -o json -f - | jq --argjson script "$(
  cat <<'SH' | jq -Rs .
s=$(cut -d' ' -f1 /proc/uptime); echo "START $JOB $s $FENCING_TOKEN" >>/record/records
trap 'sleep 6; e=$(cut -d" " -f1 /proc/uptime); echo "END $JOB $e $FENCING_TOKEN" >>/record/records; exit 0' TERM
sleep 600 & wait
SH
)" '.spec.template.spec.terminationGracePeriodSeconds = 30 | .spec.template.spec.containers[0].command = ["sh", "-c", $script]' |
  kc -n "$ns" apply -f - >/dev/null
gated_job jd-2 jobdel 1 0 | apply

# --- checks ------------------------------------------------------------------------------
token_in_log() { # job container text → the fencing token printed after TEXT
  local logs
  logs="$(kc -n "$ns" logs "job/$1" -c "$2")" || return 1
  sed -n "s/^$3\([0-9][0-9]*\)\$/\1/p" <<<"$logs" | grep . || { echo "job $1 log: $logs"; return 1; }
}
step "the init-container example: Complete, the main container read /lock/fencing-token, the lock Released"
wait_until "job reindex-products Complete" job_finished Complete reindex-products
tok="$(token_in_log reindex-products reindex 'reindexing with fencing token ')" || fail "reindex-products: $tok"
wait_until "lock reindex-products Released (holderRef Job finished)" lock_phase_is Released reindex-products
echo "    reindexing with fencing token $tok"

step "the suspend-gated example: un-suspended by the operator, Complete, FENCING_TOKEN from the annotation"
wait_until "job nightly-backup Complete" job_finished Complete nightly-backup
tok="$(token_in_log nightly-backup backup 'backing up with fencing token ')" || fail "nightly-backup: $tok"
gated_lock="$(kc -n "$ns" get distributedlocks -o json | jq -r '.items[] | select(.metadata.ownerReferences[]?.name == "nightly-backup") | .metadata.name')"
[[ -n "$gated_lock" ]] || fail "no DistributedLock owned by Job nightly-backup"
wait_until "lock $gated_lock Released" lock_phase_is Released "$gated_lock"
echo "    backing up with fencing token $tok (lock $gated_lock)"

step "a Pod deleted mid-run: its Job fails, the lock goes to the next Job"
started() { grep -q "^START $1 " "$records" || { echo "no START of $1 in $records"; return 1; }; }
wait_until "del-1 started its work" started del-1
del_pod="$(kc -n "$ns" get pods -l job-name=del-1 -o 'jsonpath={.items[0].metadata.name}')"
kc -n "$ns" delete pod "$del_pod" --grace-period=1 --wait=false >/dev/null
del_at="$(cut -d' ' -f1 /proc/uptime)"
wait_until "job del-1 Failed (its Pod was deleted)" job_finished Failed del-1
del1_lock="$(kc -n "$ns" get distributedlocks -o json | jq -r '.items[] | select(.metadata.ownerReferences[]?.name == "del-1") | .metadata.name')"
wait_until "lock of del-1 Released" lock_phase_is Released "$del1_lock"
wait_until "job del-2 Complete" job_finished Complete del-2
grep -q "^END del-1 " "$records" && fail "del-1 ran to its end: the Pod was not deleted mid-run"
del2_start="$(awk '$1 == "START" && $2 == "del-2" {print $3}' "$records")"
awk -v a="$del2_start" -v b="$del_at" 'BEGIN {exit !(a > b)}' || fail "del-2 started at $del2_start, before del-1's Pod was deleted at $del_at"
echo "    del-1's Pod deleted at $del_at, del-2 started at $del2_start"

step "a Job whose Pod fails: the lock is released, the next Job served"
wait_until "job fail-1 Failed" job_finished Failed fail-1
wait_until "lock fail-1 Released" lock_phase_is Released fail-1
wait_until "job fail-2 Complete" job_finished Complete fail-2

# intervals JOBS...: "start end token job" lines, sorted by start; every job exactly once
intervals() {
  local j s e t
  for j in "$@"; do
    s="$(awk -v j="$j" '$1 == "START" && $2 == j' "$records")"
    e="$(awk -v j="$j" '$1 == "END" && $2 == j' "$records")"
    [[ "$(wc -l <<<"$s")" == 1 && "$(wc -l <<<"$e")" == 1 && -n "$s" && -n "$e" ]] || fail "$j: records '$s' / '$e'"
    t="$(cut -d' ' -f4 <<<"$s")"
    [[ "$t" =~ ^[0-9]+$ && "$t" == "$(cut -d' ' -f4 <<<"$e")" ]] || fail "$j: bad fencing token in '$s' / '$e'"
    echo "$(cut -d' ' -f3 <<<"$s") $(cut -d' ' -f3 <<<"$e") $t $j"
  done | sort -n
}
# exclusive LINES: no overlap, tokens strictly increasing in start (= grant) order
exclusive() {
  awk '{ if (NR > 1) { if ($1 < end) { printf "%s started at %s before %s ended at %s\n", $4, $1, job, end; bad = 1 }
                       if ($3 <= tok) { printf "%s has fencing token %s after %s had %s\n", $4, $3, job, tok; bad = 1 } }
         end = $2; tok = $3; job = $4 } END { exit bad }' <<<"$1"
}
gap_report() { awk '{ if (NR > 1) printf "%s→%s %.2fs  ", job, $4, $1 - end; end = $2; job = $4 } END { print "" }' <<<"$1"; }
step "a gated Job deleted mid-run: its lock stays with its terminating Pod, then the next Job runs"
wait_until "jd-1 started its work" started jd-1
kc -n "$ns" delete job jd-1 --wait=false >/dev/null
wait_until "job jd-2 Complete" job_finished Complete jd-2
lines="$(intervals jd-1 jd-2)"
sed 's/^/    start end token job: /' <<<"$lines"
out="$(exclusive "$lines")" || fail "lock jobdel: the next Job ran while the deleted Job's Pod still worked: $out"

lines="$(intervals fail-1 fail-2)"
out="$(exclusive "$lines")" || fail "lock fail: $out"

step "mutual exclusion: 6 Jobs on lock 'mutex'"
for j in "${mutex_jobs[@]}"; do wait_until "job $j Complete" job_finished Complete "$j"; done
lines="$(intervals "${mutex_jobs[@]}")"
sed 's/^/    start end token job: /' <<<"$lines"
out="$(exclusive "$lines")" || fail "mutual exclusion broken: $out"
echo "    hand-over gaps (previous end → next start): $(gap_report "$lines")"
for j in mx-1 mx-3 mx-5; do wait_until "lock $j Released" lock_phase_is Released "$j"; done

step "the CronJob: a scheduled run (created by the CronJob controller) and the manual run, one after the other"
# (kubectl create job --from=cronjob also sets the CronJob as owner: the scheduled
# runs are those without the annotation cronjob.kubernetes.io/instantiate=manual)
scheduled_job() {
  local j
  j="$(kc -n "$ns" get jobs -o json | jq -r '[.items[] | select(.metadata.ownerReferences[]?.kind == "CronJob" and .metadata.annotations["cronjob.kubernetes.io/instantiate"] != "manual")] | sort_by(.metadata.creationTimestamp) | .[0].metadata.name // empty')"
  [[ -n "$j" ]] || { echo "no Job created by CronJob compact-index yet ($((SECONDS - cron_created)) s)"; return 1; }
  echo "$j"
}
timeout=$((timeout + 60)) wait_until "the CronJob controller created a Job" scheduled_job
cj="$(scheduled_job)"
wait_until "job compact-manual Complete" job_finished Complete compact-manual
wait_until "job $cj Complete" job_finished Complete "$cj"
kc -n "$ns" delete cronjob compact-index --cascade=orphan >/dev/null
t_manual="$(token_in_log compact-manual compact 'compacting with fencing token ')" || fail "compact-manual: $t_manual"
t_cron="$(token_in_log "$cj" compact 'compacting with fencing token ')" || fail "$cj: $t_cron"
((t_cron > t_manual)) || fail "the scheduled run (token $t_cron) should follow the manual run (token $t_manual)"
m_end="$(kc -n "$ns" get job compact-manual -o 'jsonpath={.status.completionTime}')"
c_start="$(kc -n "$ns" get job "$cj" -o 'jsonpath={.status.startTime}')"
[[ "$(date -d "$c_start" +%s)" -ge "$(date -d "$m_end" +%s)" ]] ||
  fail "the scheduled run started ($c_start) before the manual run completed ($m_end)"
echo "    compact-manual token $t_manual, completed $m_end; $cj token $t_cron, started $c_start"
echo "ok: the examples, mutual exclusion of 6 Jobs, a failed and a deleted Pod, through the real kubelet and Job/CronJob controllers ($((SECONDS - t_start)) s)"
