#!/usr/bin/env bash
# A loopback → unix socket → loopback relay, so that Pods on the node's Pod
# network reach the API server and the search node of testenv, which listen on
# the host's 127.0.0.1 only (there is no kube-proxy, no Service routing, and no
# connection may go to the node's bridge address). Every hop stays on loopback
# or a unix socket:
#   Pod: process → 127.0.0.1:PORT (Pod netns) → sidecar socat → /relay/NAME.sock
#   host: socat on DIR/NAME.sock (a hostPath volume) → 127.0.0.1:PORT (host netns)
# A real cluster needs none of this: its Pods reach the API server's Service.
#
#   tests/e2e-relay.sh image             builds local/socat:1 (socat + the libraries
#                                        it links, user 65532) into the node's containerd
#   tests/e2e-relay.sh start DIR N=PORT…  host side: DIR/N.sock → 127.0.0.1:PORT
#   tests/e2e-relay.sh stop DIR          stops the host side started for DIR
# Needs socat on the host (apt-get install socat) and umoci/ctr (testenv/node-deps.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
die() { echo "e2e-relay: $*" >&2; exit 1; }
cache="${KLM_CACHE_DIR:-$HOME/.cache/kube-lock-manager}"
run="${KLM_RUN_DIR:-$cache/run}"
socat_bin="$(command -v socat)" || die "socat is required on the host: apt-get install socat"

case "${1:-}" in
  image)
    for t in umoci ctr ldd; do command -v "$t" >/dev/null || die "$t is required (testenv/node-deps.sh)"; done
    sock="$run/containerd/containerd.sock"
    [[ -S "$sock" ]] || die "no node containerd at $sock: testenv/testenv up --node"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    export SOURCE_DATE_EPOCH=0
    umoci init --layout "$work/oci"
    umoci new --image "$work/oci:1"
    umoci unpack --image "$work/oci:1" "$work/bundle" >/dev/null
    r="$work/bundle/rootfs"
    mkdir -p "$r/etc" "$r/tmp" && chmod 1777 "$r/tmp"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' >"$r/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$r/etc/group"
    install -D -m 0755 "$socat_bin" "$r/usr/bin/socat"
    for lib in $(ldd "$socat_bin" | grep -o '/[^ ]*'); do
      install -D -m 0755 "$(readlink -f "$lib")" "$r$lib"
    done
    umoci repack --image "$work/oci:1" "$work/bundle"
    umoci config --image "$work/oci:1" --config.user 65532:65532 --config.entrypoint /usr/bin/socat \
      --config.label org.opencontainers.image.title=socat --history.created_by "tests/e2e-relay.sh image"
    umoci gc --layout "$work/oci"
    tar -C "$work/oci" -cf "$work/socat.tar" .
    ctr --address "$sock" -n k8s.io images import --base-name docker.io/local/socat "$work/socat.tar" >/dev/null
    refs="$(ctr --address "$sock" -n k8s.io images ls -q)"
    grep -qx docker.io/local/socat:1 <<<"$refs" || die "importing did not create docker.io/local/socat:1"
    echo local/socat:1
    ;;
  start)
    dir="${2:?start DIR NAME=PORT...}"
    shift 2
    mkdir -p "$dir"
    chmod 755 "$dir"
    for np in "$@"; do
      name="${np%%=*}" port="${np#*=}"
      [[ "$port" =~ ^[0-9]+$ ]] || die "bad NAME=PORT: $np"
      # 0666: the Pod's sidecar runs as 65532; only loopback behind it
      setsid "$socat_bin" "UNIX-LISTEN:$dir/$name.sock,fork,unlink-early,mode=666" "TCP:127.0.0.1:$port" \
        </dev/null >>"$dir/$name.log" 2>&1 &
      echo $! >"$dir/$name.pid"
      for _ in $(seq 100); do [[ -S "$dir/$name.sock" ]] && break; sleep 0.05; done
      [[ -S "$dir/$name.sock" ]] || die "socat did not create $dir/$name.sock: $(cat "$dir/$name.log")"
    done
    ;;
  stop)
    dir="${2:?stop DIR}"
    for pidfile in "$dir"/*.pid; do
      [[ -f "$pidfile" ]] || continue
      pid="$(cat "$pidfile")"
      kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true # socat and its per-connection children
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      rm -f "$pidfile"
    done
    rm -rf "$dir"
    ;;
  *) sed -n '2,/^set -e/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
