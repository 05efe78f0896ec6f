#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs the main job: a gateway with the
# managed Podman driver on its embedded SQLite store, a sandbox running a
# command, its logs, its deletion, and a clean gateway stop. Safe to run
# again: each run uses fresh private directories and cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "== installing packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ca-certificates gcc libc6-dev \
    podman runc uidmap netavark aardvark-dns iptables busybox-static >/dev/null
fi

echo "== building (release)"
cargo build --release --locked -p openshell-server -p openshell-driver-podman -p openshell-cli

echo "== local busybox image (no registry needed)"
scripts/podman-test-image.sh

image=localhost/openshell-busybox:latest
dir="$(mktemp -d /tmp/openshell-quickstart.XXXXXX)"
socket="$dir/run/gateway.sock"
cli=(target/release/openshell --gateway "unix://$socket")
gateway=""
cleanup() {
  if [ -n "$gateway" ] && kill -0 "$gateway" 2>/dev/null; then
    kill -TERM "$gateway" && wait "$gateway" || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

cat > "$dir/gateway.toml" <<TOML
[openshell.gateway]
compute_drivers = ["podman"]

[openshell.drivers.podman]
default_image = "$image"
TOML

echo "== starting openshell-gateway with the podman driver (log: $dir/gateway.log)"
target/release/openshell-gateway --config "$dir/gateway.toml" \
  --run-dir "$dir/run" --state-dir "$dir/state" --listen "unix://$socket" \
  >"$dir/gateway.log" 2>&1 &
gateway=$!
for _ in $(seq 300); do
  "${cli[@]}" gateway info >/dev/null 2>&1 && break
  kill -0 "$gateway" 2>/dev/null || { cat "$dir/gateway.log" >&2; exit 1; }
  sleep 0.1
done
"${cli[@]}" gateway info

echo "== creating sandbox 'hello'"
"${cli[@]}" sandbox create hello -- sh -c 'echo "Hello from an OpenShell sandbox on $(uname -sr)"; exec sleep 3600'
"${cli[@]}" sandbox list

echo "== its logs"
for _ in $(seq 50); do
  out="$("${cli[@]}" sandbox logs hello)"
  [ -n "$out" ] && break
  sleep 0.1
done
printf '%s\n' "$out"

echo "== deleting it"
"${cli[@]}" sandbox delete hello

echo "== stopping the gateway"
kill -TERM "$gateway"
wait "$gateway"
gateway=""
echo "done: the gateway stopped cleanly"
