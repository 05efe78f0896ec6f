#!/usr/bin/env bash
# Builds the local test image for the Podman driver, without a registry:
# a busybox-static root filesystem (/bin/busybox plus one link per applet,
# so /bin/sh exists) imported with `podman import`.
#
#   scripts/podman-test-image.sh [IMAGE]      default: localhost/openshell-busybox:latest
#
# Idempotent: an image that already exists is left alone (set REBUILD=1 to
# replace it). Needs podman and a statically linked busybox
# (Debian: apt-get install podman busybox-static). Extra podman global
# options (e.g. `--url unix:///path.sock`) can be given in PODMAN_OPTS.
set -euo pipefail

image="${1:-localhost/openshell-busybox:latest}"
podman_cmd=(podman)
if [ -n "${PODMAN_OPTS:-}" ]; then
  # shellcheck disable=SC2206 # word splitting is the point
  podman_cmd+=(${PODMAN_OPTS})
fi

if ! command -v podman >/dev/null 2>&1; then
  echo "error: podman is not installed (Debian: apt-get install podman)" >&2
  exit 1
fi

if [ "${REBUILD:-0}" != "1" ] && "${podman_cmd[@]}" image exists "$image"; then
  echo "$image already exists"
  exit 0
fi

busybox=""
for candidate in "${BUSYBOX:-}" /bin/busybox /usr/bin/busybox; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then
    busybox="$candidate"
    break
  fi
done
if [ -z "$busybox" ]; then
  echo "error: no busybox binary found (Debian: apt-get install busybox-static, or set BUSYBOX=/path)" >&2
  exit 1
fi
# A dynamically linked busybox would need its libraries inside the image.
if command -v file >/dev/null 2>&1 && ! file -L "$busybox" | grep -q 'statically linked'; then
  echo "error: $busybox is not statically linked (Debian: apt-get install busybox-static)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,dev,etc,proc,sys,tmp,root,run}
chmod 1777 "$rootfs/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"

tar -C "$rootfs" --numeric-owner -cf "$work/rootfs.tar" .
"${podman_cmd[@]}" import \
  --change 'CMD ["/bin/sh"]' \
  --change 'ENV PATH=/bin' \
  --message "openshell test image: busybox-static" --quiet \
  "$work/rootfs.tar" "$image" >/dev/null
echo "built $image"
