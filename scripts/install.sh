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
# llama-cpp-python has no wheel for this platform on PyPI: scripts/llama-wheel.sh builds a portable one
# (not for this machine's CPU: see there) once and caches it; the venv gets that build, never pip's.
wheel=$(bash scripts/llama-wheel.sh .venv/bin/python)
if [ "$(cat .venv/.quantpub-llama-wheel 2>/dev/null)" != "$wheel" ]; then
    .venv/bin/python -m pip install --quiet --no-deps --force-reinstall "$wheel"
    echo "$wheel" > .venv/.quantpub-llama-wheel
fi
.venv/bin/python -m pip install --quiet -e '.[test]'
# llama.cpp's HF->GGUF converter ships only in the llama-cpp-python sdist: fetch and cache it now.
.venv/bin/quantpub doctor --fetch
# git-lfs and headless chromium for the hub's git and browser tests (Debian packages).
bash scripts/install-test-tools.sh
.venv/bin/quantpub --version
