#!/usr/bin/env bash
# Runs the end-to-end buckets: real openshell-gateway, driver and openshell
# binaries on private temp dirs. Buckets that need something this machine
# lacks (Podman, hardware KVM and a guest kernel) print why and skip.
#
#   scripts/e2e.sh                 all buckets: podman external multi faults vm foreign remote
#   scripts/e2e.sh podman faults   only these
set -euo pipefail
cd "$(dirname "$0")/.."

all=(podman external multi faults vm foreign remote)
buckets=("$@")
[ ${#buckets[@]} -eq 0 ] && buckets=("${all[@]}")
for bucket in "${buckets[@]}"; do
  case " ${all[*]} " in
    *" $bucket "*) ;;
    *) echo "error: unknown bucket '$bucket'; one of: ${all[*]}" >&2; exit 2 ;;
  esac
done
features=$(IFS=,; echo "${buckets[*]}")
tests=()
for bucket in "${buckets[@]}"; do tests+=(--test "$bucket"); done

# One cargo invocation: one build, then each bucket's binary in turn. Tests
# within a bucket run one at a time: they share one Podman engine and two
# cores, and each starts a gateway and drivers of its own.
cargo test --locked -p openshell-e2e --features "$features" "${tests[@]}" -- --test-threads=1
