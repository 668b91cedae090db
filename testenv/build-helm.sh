#!/usr/bin/env bash
# Builds the helm CLI from the Go module helm.sh/helm/v3 into a cache
# directory keyed by version, and reuses it. Prints the binary's path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${KLM_CACHE_DIR:-$HOME/.cache/kube-lock-manager}"
out="$cache/bin/helm-$HELM_VERSION"
if [[ -x "$out/helm" ]]; then
  echo "$out/helm"
  exit 0
fi
command -v go >/dev/null || { echo "testenv: go is required to build helm" >&2; exit 1; }
mkdir -p "$out" "$cache"
work="$(mktemp -d "$cache/helm-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=mod" GOTOOLCHAIN=local
cd "$work"
cat >go.mod <<GOMOD
module klm.local/helm

go 1.24

require helm.sh/helm/v3 $HELM_VERSION
GOMOD
cat >tools.go <<'GO'
//go:build tools

package tools

import _ "helm.sh/helm/v3/cmd/helm"
GO
echo "testenv: building helm $HELM_VERSION" >&2
go mod tidy >/dev/null 2>&1 || go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >/dev/null
go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$out/helm" helm.sh/helm/v3/cmd/helm
echo "$out/helm"
