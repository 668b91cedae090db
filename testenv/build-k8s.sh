#!/usr/bin/env bash
# Builds kube-apiserver (from the Go module k8s.io/kubernetes) and etcd (from
# go.etcd.io/etcd/server/v3) into a cache directory keyed by version, and reuses
# them when present. Prints the directory that holds the binaries.
#
#   build-k8s.sh node   builds the node's parts instead: kubelet,
#                       kube-controller-manager and kube-scheduler, from the same
#                       wrapper module, into $cache/bin/k8s-node-<version>.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${KLM_CACHE_DIR:-$HOME/.cache/kube-lock-manager}"
out="$cache/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
log() { echo "testenv: $*" >&2; }
minor="${K8S_VERSION#v1.}"
staging_version="v0.$minor"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*} -X k8s.io/component-base/version.gitTreeState=clean"

# k8s.io/kubernetes lists its staging modules at v0.0.0 (they live in its repo);
# a wrapper module replaces each of them with the published v0.X.Y release.
# wrapper_module NAME CMD... writes go.mod + tools.go in the current directory.
wrapper_module() {
  local name="$1"; shift
  local gomod
  log "resolving k8s.io/kubernetes@$K8S_VERSION"
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
  {
    echo "module klm.local/$name"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } >go.mod
  {
    echo '//go:build tools'
    echo
    echo 'package tools'
    echo
    local c
    for c in "$@"; do echo "import _ \"k8s.io/kubernetes/cmd/$c\""; done
  } >tools.go
  log "downloading $* dependencies"
  go mod tidy -e >/dev/null 2>&1 || true
  for c in "$@"; do go get "k8s.io/kubernetes/cmd/$c@$K8S_VERSION" >/dev/null; done
}

if [[ "${1:-}" == node ]]; then
  node_out="$cache/bin/k8s-node-$K8S_VERSION"
  node_cmds=(kubelet kube-controller-manager kube-scheduler)
  if [[ -x "$node_out/kubelet" && -x "$node_out/kube-controller-manager" && -x "$node_out/kube-scheduler" ]]; then
    echo "$node_out"
    exit 0
  fi
  command -v go >/dev/null || { log "go is required to build the kubelet (install Go >= 1.24)"; exit 1; }
  mkdir -p "$node_out" "$cache"
  work="$(mktemp -d "$cache/build-node.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  # The kubelet builds without cgo (as upstream's release builds do); so do the others.
  export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod" GOTOOLCHAIN=local
  cd "$work"
  wrapper_module node "${node_cmds[@]}"
  for c in "${node_cmds[@]}"; do
    log "building $c $K8S_VERSION (minutes on a cold cache)"
    go build -trimpath -ldflags "$ldflags" -o "$work/$c" "k8s.io/kubernetes/cmd/$c"
  done
  for c in "${node_cmds[@]}"; do mv "$work/$c" "$node_out/$c"; done
  log "built into $node_out"
  echo "$node_out"
  exit 0
fi

if [[ -x "$out/kube-apiserver" && -x "$out/etcd" ]]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { log "go is required to build kube-apiserver and etcd (install Go >= 1.24)"; exit 1; }
mkdir -p "$out"
work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod" GOTOOLCHAIN=local

# --- kube-apiserver --------------------------------------------------------
mkdir -p "$work/apiserver"
cd "$work/apiserver"
wrapper_module apiserver kube-apiserver
log "building kube-apiserver $K8S_VERSION (several minutes on a cold cache)"
go build -trimpath -ldflags "$ldflags" -o "$work/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver

# --- etcd ------------------------------------------------------------------
mkdir -p "$work/etcd"
cd "$work/etcd"
cat >go.mod <<GOMOD
module klm.local/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
cat >main.go <<'GO'
// etcd, built from its server module: the same entry point as the etcd binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
log "downloading etcd $ETCD_VERSION dependencies"
go mod tidy >/dev/null
log "building etcd $ETCD_VERSION"
go build -trimpath -ldflags "-s -w" -o "$work/etcd-bin" .

mv "$work/kube-apiserver" "$out/kube-apiserver"
mv "$work/etcd-bin" "$out/etcd"
log "built into $out"
echo "$out"
