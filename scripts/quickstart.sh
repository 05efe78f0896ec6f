#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs the main job of this stage:
# build everything, start a compute driver on a private Unix socket, ask it
# for its capabilities over gRPC, and stop it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ca-certificates gcc libc6-dev >/dev/null
fi

cargo build --release --locked --bins

run_dir="$(mktemp -d /tmp/openshell-quickstart.XXXXXX)"
socket="$run_dir/run/driver.sock"
trap 'kill "$driver" 2>/dev/null || true; rm -rf "$run_dir"' EXIT

target/release/openshell-test-driver --bind-socket "$socket" --allow-same-uid-peer &
driver=$!
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.05; done

echo "driver answering on $socket:"
target/release/openshell-test-driver probe --socket "$socket"
kill -TERM "$driver"
wait "$driver"
echo "driver stopped; socket removed: $([ -e "$socket" ] && echo no || echo yes)"
