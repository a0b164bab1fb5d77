#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1 MPQ_DATA_DIR="$PWD/data" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -q "$@"
