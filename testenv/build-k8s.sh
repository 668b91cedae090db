#!/usr/bin/env bash
# Builds kube-apiserver (from the Go module k8s.io/kubernetes) and etcd (from
# go.etcd.io/etcd/server/v3) into a cache directory keyed by version, and reuses
# them when present. Prints the directory that holds the binaries.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${KLM_CACHE_DIR:-$HOME/.cache/kube-lock-manager}"
out="$cache/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
log() { echo "testenv: $*" >&2; }

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
# k8s.io/kubernetes lists its staging modules at v0.0.0 (they live in its repo);
# a wrapper module replaces each of them with the published v0.X.Y release.
minor="${K8S_VERSION#v1.}"
staging_version="v0.$minor"
mkdir -p "$work/apiserver"
cd "$work/apiserver"
log "resolving k8s.io/kubernetes@$K8S_VERSION"
gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
{
  echo "module klm.local/apiserver"
  echo
  echo "go 1.24"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
} >go.mod
cat >tools.go <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
log "downloading kube-apiserver dependencies"
go mod tidy -e >/dev/null 2>&1 || true
go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" >/dev/null
log "building kube-apiserver $K8S_VERSION (several minutes on a cold cache)"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*} -X k8s.io/component-base/version.gitTreeState=clean"
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
