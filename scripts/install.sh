#!/usr/bin/env bash
# Install quantpub and its test tools into ./.venv on a fresh machine.
# torch goes first, pinned: an unpinned torch (or a package asking for one) pulls the CUDA
# build and gigabytes of CUDA libraries; 2.13.0 resolves to the CPU build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/quantpub --version
