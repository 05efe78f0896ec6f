#!/usr/bin/env bash
# Makes the Python environment the foreign-peer tests use: a virtual
# environment under target/python with stock grpcio and grpcio-tools from
# PyPI (the Python driver compiles proto/ with grpcio-tools when it starts).
# Idempotent; the e2e `foreign` bucket and the driver-check tests skip, and
# say why, where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${OPENSHELL_PYTHON_ENV:-$PWD/target/python}"
# grpcio 1.57 and later send the socket path as :authority on Unix sockets,
# the behaviour the tests must cope with; pin what was tested.
packages=(grpcio==1.85.1 grpcio-tools==1.85.1)

if [ -x "$venv/bin/python3" ] && "$venv/bin/python3" -c 'import grpc, grpc_tools' 2>/dev/null; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
"$venv/bin/python3" -c 'import grpc; print("python env ready: grpcio", grpc.__version__)'
