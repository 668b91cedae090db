#!/usr/bin/env bash
# The lockctl OCI image that testenv/images.sh builds keeps the Dockerfile's
# contract: the User and Entrypoint of its final stage (read from the Dockerfile),
# no Cmd, no shell, nonroot in /etc/passwd, and the binary runs with the image's
# own loader and libraries only. Needs no running services.
#   tests/image.sh   (builds target/release/lockctl's image when missing or stale)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
fail() { echo "FAIL: $*" >&2; exit 1; }
cache="${KLM_CACHE_DIR:-$HOME/.cache/kube-lock-manager}"
images="${KLM_IMAGES_DIR:-$cache/images}"

testenv/images.sh build lockctl
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$images/lockctl.tar"
blob() { echo "$work/blobs/${1/://}"; }
manifest="$(blob "$(jq -r '.manifests[0].digest' "$work/index.json")")"
config="$(blob "$(jq -r '.config.digest' "$manifest")")"

# The contract, read from the Dockerfile's final stage (the part after the last FROM).
final_stage="$(awk '/^FROM /{s=""} {s=s $0 "\n"} END{printf "%s", s}' Dockerfile)"
want_user="$(sed -n 's/^USER[[:space:]]\+//p' <<<"$final_stage")"
want_entrypoint="$(sed -n 's/^ENTRYPOINT[[:space:]]\+//p' <<<"$final_stage" | jq -c .)"
[[ -n "$want_user" && -n "$want_entrypoint" ]] || fail "could not read USER/ENTRYPOINT from the Dockerfile's final stage"

user="$(jq -r '.config.User' "$config")"
entrypoint="$(jq -c '.config.Entrypoint' "$config")"
cmd="$(jq -c '.config.Cmd' "$config")"
[[ "$user" == "$want_user" ]] || fail "User is '$user', the Dockerfile says '$want_user'"
[[ "$entrypoint" == "$want_entrypoint" ]] || fail "Entrypoint is $entrypoint, the Dockerfile says $want_entrypoint"
[[ "$cmd" == null || "$cmd" == "[]" ]] || fail "Cmd is $cmd, the Dockerfile sets none"
[[ "$(jq -r '.architecture + "/" + .os' "$config")" == "$(go env GOARCH 2>/dev/null || echo amd64)/linux" ]] ||
  fail "platform is $(jq -r '.architecture + "/" + .os' "$config")"

# The files: one layer, unpacked.
mkdir "$work/rootfs"
for l in $(jq -r '.layers[].digest' "$manifest"); do tar -C "$work/rootfs" -xzf "$(blob "$l")"; done
bin="$work/rootfs${want_entrypoint:2:-2}"
[[ -x "$bin" ]] || fail "the entrypoint ${want_entrypoint} is not an executable in the image"
# it is this checkout's binary, not one another checkout cached
[[ "$(sha256sum <"$bin")" == "$(sha256sum <target/release/lockctl)" ]] ||
  fail "the image's lockctl is not target/release/lockctl of this checkout"
for sh in bin/sh bin/bash usr/bin/sh bin/busybox; do
  [[ ! -e "$work/rootfs/$sh" && ! -L "$work/rootfs/$sh" ]] || fail "the image contains a shell: /$sh"
done
grep -q '^nonroot:x:65532:65532:' "$work/rootfs/etc/passwd" || fail "/etc/passwd lacks nonroot (65532)"
[[ "$(stat -c %a "$work/rootfs/tmp")" == 1777 ]] || fail "/tmp is not 1777"
# every shared library the binary needs is in the image (resolved inside the rootfs)
for lib in $(ldd target/release/lockctl | grep -o '/[^ ]*'); do
  [[ -e "$work/rootfs$lib" ]] || fail "the image lacks $lib, which lockctl needs"
done
# and the image's own binary runs against the image's own libraries only
interp="$(ldd target/release/lockctl | grep -o '/[^ ]*ld-linux[^ ]*' | head -n1)"
libdirs="$(ldd target/release/lockctl | grep -o '/[^ ]*' | xargs -n1 dirname | sort -u | sed "s|^|$work/rootfs|" | paste -sd:)"
version="$("$work/rootfs$interp" --inhibit-cache --library-path "$libdirs" "$bin" --version)"
[[ "$version" == *"$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"* ]] || fail "lockctl --version said '$version'"
echo "ok: lockctl image: User $user, Entrypoint $entrypoint, no shell, libraries present ($version)"
