#!/usr/bin/env bash
# OCI images without Docker or a registry, built with umoci:
#   local/lockctl:<version>  the Dockerfile's final stage: target/release/lockctl at
#                            /usr/local/bin/lockctl, the shared libraries it links (ldd),
#                            CA certificates, /etc/passwd with nonroot (65532), no shell;
#                            User 65532:65532, Entrypoint ["/usr/local/bin/lockctl"]
#   local/pause:1            the Pod sandbox: busybox-static `sleep 2147483647`
#   local/busybox:1          a small workload image: busybox-static and its applets
#
#   testenv/images.sh build [pause|busybox|lockctl]...   OCI archives into $KLM_IMAGES_DIR
#   testenv/images.sh import [pause|busybox|lockctl]...  import them into the testenv node's
#                                                        containerd (k8s.io namespace) as
#                                                        docker.io/local/NAME:TAG
#   testenv/images.sh [NAME]...                          build, then import if the node runs
#   testenv/images.sh ref NAME                           print the image reference (local/NAME:TAG)
#
# Settings: KLM_LOCKCTL_BIN (default target/release/lockctl), KLM_IMAGES_DIR (default
# $KLM_CACHE_DIR/images), KLM_RUN_DIR (the node's containerd socket is $KLM_RUN_DIR/containerd/containerd.sock).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="${KLM_CACHE_DIR:-$HOME/.cache/kube-lock-manager}"
run="${KLM_RUN_DIR:-$cache/run}"
images="${KLM_IMAGES_DIR:-$cache/images}"
lockctl_bin="${KLM_LOCKCTL_BIN:-$root/target/release/lockctl}"
log() { echo "images: $*" >&2; }
die() { log "error: $*"; exit 1; }

lockctl_version() { sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1; }
tag_of() {
  case "$1" in
    lockctl) lockctl_version ;;
    pause | busybox) echo 1 ;;
    *) die "unknown image '$1' (pause, busybox, lockctl)" ;;
  esac
}

# A fixed timestamp keeps the layers reproducible (same input → same digest).
export SOURCE_DATE_EPOCH=0

# new_image NAME TAG → an empty OCI layout $work/oci with image NAME:TAG unpacked in $work/bundle
new_image() {
  rm -rf "$work"
  mkdir -p "$work"
  umoci init --layout "$work/oci"
  umoci new --image "$work/oci:$2"
  umoci unpack --image "$work/oci:$2" "$work/bundle" >/dev/null
}

base_files() { # rootfs
  local r="$1"
  mkdir -p "$r/etc" "$r/tmp" "$r/home/nonroot" "$r/root"
  chmod 1777 "$r/tmp"
  chown 65532:65532 "$r/home/nonroot"
  chmod 700 "$r/root"
  # the same users as distroless: root, nobody and nonroot (65532)
  cat >"$r/etc/passwd" <<'P'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
P
  cat >"$r/etc/group" <<'G'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
G
  echo 'hosts: files dns' >"$r/etc/nsswitch.conf"
}

finish_image() { # name tag umoci-config-args...
  local name="$1" tag="$2"; shift 2
  umoci repack --image "$work/oci:$tag" "$work/bundle"
  umoci config --image "$work/oci:$tag" --config.workingdir / "$@" \
    --config.label "org.opencontainers.image.title=$name" --history.created_by "testenv/images.sh $name"
  umoci gc --layout "$work/oci"
  mkdir -p "$images"
  # An OCI archive is the layout directory as a tar; ctr import reads it.
  # (a temporary file of our own: builds from several checkouts may run at once)
  local tmp
  tmp="$(mktemp "$images/$name.tar.XXXXXX")"
  tar -C "$work/oci" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$tmp" .
  mv "$tmp" "$images/$name.tar"
  echo "$tag" >"$images/$name.tag"
  if [[ "$name" == lockctl ]]; then sha256sum <"$lockctl_bin" | cut -d' ' -f1 >"$images/$name.binary"; fi
  log "built $images/$name.tar (local/$name:$tag)"
}

build_pause() {
  local r="$work/bundle/rootfs"
  new_image pause 1
  base_files "$r"
  # busybox runs the applet named by argv[0], else by argv[1]: keep its own name
  install -D -m 0755 /bin/busybox "$r/bin/busybox"
  finish_image pause 1 --config.entrypoint /bin/busybox --config.entrypoint sleep --config.entrypoint 2147483647 --config.user 65535:65535
}

build_busybox() {
  local r="$work/bundle/rootfs" a
  new_image busybox 1
  base_files "$r"
  install -D -m 0755 /bin/busybox "$r/bin/busybox"
  for a in $(/bin/busybox --list); do
    [[ "$a" == busybox ]] || ln -s busybox "$r/bin/$a"
  done
  finish_image busybox 1 --config.env PATH=/bin --config.cmd sh
}

build_lockctl() {
  [[ -x "$lockctl_bin" ]] || die "$lockctl_bin is missing: run \`cargo build --release --locked --bin lockctl\` (or set KLM_LOCKCTL_BIN)"
  local r="$work/bundle/rootfs" tag lib
  tag="$(lockctl_version)"
  new_image lockctl "$tag"
  base_files "$r"
  install -D -m 0755 "$lockctl_bin" "$r/usr/local/bin/lockctl"
  # the shared libraries it needs (the dynamic loader included), at their own paths
  for lib in $(ldd "$lockctl_bin" | grep -o '/[^ ]*'); do
    install -D -m 0755 "$(readlink -f "$lib")" "$r$lib"
  done
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
  fi
  [[ ! -e "$r/bin/sh" ]] || die "the lockctl image must not contain a shell"
  finish_image lockctl "$tag" --config.user 65532:65532 --config.entrypoint /usr/local/bin/lockctl \
    --config.env PATH=/usr/local/bin:/usr/bin:/bin --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
}

sock="$run/containerd/containerd.sock"
import_one() {
  local name="$1" tag
  [[ -f "$images/$name.tar" ]] || die "$images/$name.tar is missing: run \`testenv/images.sh build $name\`"
  tag="$(cat "$images/$name.tag")"
  ctr --address "$sock" -n k8s.io images import --base-name "docker.io/local/$name" "$images/$name.tar" >/dev/null
  local refs
  refs="$(ctr --address "$sock" -n k8s.io images ls -q)" # (not piped into grep -q: SIGPIPE under pipefail)
  grep -qx "docker.io/local/$name:$tag" <<<"$refs" ||
    die "importing $name did not create docker.io/local/$name:$tag"
  log "imported docker.io/local/$name:$tag"
}

for t in umoci ldd tar; do command -v "$t" >/dev/null || die "$t is required (testenv/node-deps.sh installs umoci)"; done
[[ -x /bin/busybox ]] || die "/bin/busybox is required (apt-get install busybox-static)"

cmd=all
case "${1:-}" in build | import | all | ref) cmd="$1"; shift ;; esac
names=("$@")
if ((${#names[@]} == 0)); then
  names=(pause busybox)
  [[ -x "$lockctl_bin" ]] && names+=(lockctl)
fi
if [[ "$cmd" == ref ]]; then echo "local/${names[0]}:$(tag_of "${names[0]}")"; exit 0; fi
work="$(mktemp -d "${TMPDIR:-/tmp}/klm-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# up to date: the archive is newer than this script and, for lockctl, holds
# exactly this binary (by its hash: the cache is shared by every checkout)
fresh() {
  local tar="$images/$1.tar"
  [[ -z "${KLM_IMAGES_REBUILD:-}" && -f "$tar" && -f "$images/$1.tag" && "$tar" -nt "$0" ]] || return 1
  [[ "$1" != lockctl ]] || {
    [[ "$(cat "$images/$1.tag")" == "$(lockctl_version)" ]] &&
      [[ "$(cat "$images/$1.binary" 2>/dev/null)" == "$(sha256sum <"$lockctl_bin" | cut -d' ' -f1)" ]]
  }
}
if [[ "$cmd" == build || "$cmd" == all ]]; then
  for n in "${names[@]}"; do
    tag_of "$n" >/dev/null
    fresh "$n" || "build_$n"
  done
fi
if [[ "$cmd" == import || ( "$cmd" == all && -S "$sock" ) ]]; then
  for n in "${names[@]}"; do import_one "$n"; done
fi
