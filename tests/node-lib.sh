# Helpers of every test on the real node (tests/node.sh, tests/e2e-lib.sh);
# sourced, not run. Reads the environment of `testenv/testenv up --node`.
#   wait_until WHAT CMD...     polls CMD until it succeeds, at most $timeout s
#                              (exit 99 from CMD stops at once)
#   jsonpath_is WANT RES PATH  RES's jsonpath PATH in $ns equals WANT
# shellcheck shell=bash
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
fail() {
  echo "FAIL: $*" >&2
  diagnose >&2 || true
  exit 1
}
# What a failed wait leaves to read: the node's conditions (DiskPressure taints it), the
# test namespace's Pods and its latest events, and the disk the node's kubelet sees.
diagnose() {
  echo "--- diagnosis: node conditions"
  kc get nodes -o 'jsonpath={range .items[*]}{.metadata.name}: {range .status.conditions[*]}{.type}={.status} {end}{" taints:"}{.spec.taints[*].key}{"\n"}{end}'
  [[ -n "${ns:-}" ]] || return 0
  echo "--- diagnosis: Pods and events in $ns"
  kc -n "$ns" get pods -o wide
  kc -n "$ns" get events --sort-by=.lastTimestamp | tail -n 15
  df -h "${KLM_RUN_DIR:-$HOME}" | tail -n 1
}
step() { echo "--- $*"; }
kc() { kubectl --request-timeout=30s "$@"; }

eval "$(testenv/testenv env)"
[[ "${KLM_NODE:-}" == 1 ]] || fail "the test environment has no node: run \`testenv/testenv up --node\`"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
api_port="$KLM_APISERVER_PORT"

# Polls until the command succeeds; fails with what it last printed at the deadline.
wait_until() {
  local what="$1" deadline=$((SECONDS + timeout)) out="" rc
  shift
  until out="$("$@" 2>&1)"; do
    rc=$?
    ((rc != 99)) || fail "$what: $out"
    ((SECONDS < deadline)) || fail "$what: not within ${timeout}s (last: $out)"
    sleep 0.3
  done
}
jsonpath_is() { # want resource jsonpath
  local got
  got="$(kc -n "$ns" get "$2" -o "jsonpath=$3")"
  [[ "$got" == "$1" ]] || { echo "$2 $3 = '$got'"; return 1; }
}
