#!/usr/bin/env bash
# Installs, when missing, the Debian packages the node needs: containerd (1.6,
# with its CRI plugin), runc, the CNI plugins, umoci (OCI image building) and
# busybox-static (pause and workload images), util-linux, iproute2 and jq.
# Needs root and the Debian archive.
set -euo pipefail
log() { echo "testenv: $*" >&2; }
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have containerd || need+=(containerd)
have runc || need+=(runc)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || need+=(containernetworking-plugins)
have umoci || need+=(umoci)
[[ -x /bin/busybox ]] || need+=(busybox-static)
have unshare && have nsenter || need+=(util-linux)
have ip || need+=(iproute2)
have jq || need+=(jq) # tests/image.sh
((${#need[@]} == 0)) && exit 0
[[ $(id -u) == 0 ]] || { log "error: missing packages (${need[*]}); install them as root: apt-get install -y ${need[*]}"; exit 1; }
log "installing ${need[*]} from the Debian archive"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${need[@]}" >&2 ||
  { apt-get update >&2 && apt-get install -y --no-install-recommends "${need[@]}" >&2; }
