#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints, the workspace's tests and the
# end-to-end buckets. Tests that need something this machine lacks (Podman,
# hardware KVM, a guest kernel) skip themselves and say why.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -D warnings (all e2e buckets compiled)"
cargo clippy --workspace --all-targets --locked --features openshell-e2e/podman,openshell-e2e/external,openshell-e2e/multi,openshell-e2e/faults,openshell-e2e/vm,openshell-e2e/foreign,openshell-e2e/remote -- -D warnings

echo "== cargo test --workspace"
cargo test --workspace --locked

echo "== Python peers (grpcio) for the foreign bucket"
scripts/python-env.sh || echo "warning: no Python grpcio environment; foreign-peer tests will skip"

echo "== end-to-end buckets"
scripts/e2e.sh
