#!/usr/bin/env bash
# Print the path of a portable llama-cpp-python wheel, building it once per (version, flags, machine
# architecture) into ~/.cache/quantpub/wheels (QUANTPUB_CACHE).
#
#   bash scripts/llama-wheel.sh [PYTHON]          PYTHON builds it (default .venv/bin/python)
#
# Portable: llama.cpp's default GGML_NATIVE=ON compiles for the build machine's CPU (-march=native:
# AVX-512, AMX, ...), so a venv built on one machine dies with SIGILL on an older CPU, and on Sapphire
# Rapids and later Xeons the AMX buffer type it enables crashes quantized GGUF evaluation (SIGSEGV in
# llama_decode). GGML_NATIVE=OFF builds the x86-64-v3 baseline (SSE4.2, AVX, AVX2, BMI2, FMA, F16C; no
# AVX-512, no AMX) on x86_64 and plain ARMv8-A on aarch64. CMAKE_ARGS is appended (a CUDA build, or
# another CPU level); it is part of the cache key, so changed flags build a new wheel instead of reusing
# pip's cached one, which pip keys by version alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}
version=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
[ -n "$version" ] || { echo "llama-wheel: no llama-cpp-python pin in pyproject.toml" >&2; exit 2; }
flags="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF${CMAKE_ARGS:+ $CMAKE_ARGS}"
key=$(printf '%s|%s|%s' "$version" "$flags" "$(uname -m)" | sha256sum | cut -c1-12)
dir=${QUANTPUB_CACHE:-$HOME/.cache/quantpub}/wheels/llama-cpp-python-$version-$key
if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    echo "llama-wheel: building llama-cpp-python $version with $flags (once; about 5 minutes on 2 cores)" >&2
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$python" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$version" -w "$dir.partial" >&2
    printf '%s\n' "$flags" > "$dir.partial/CMAKE_ARGS"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
fi
ls "$dir"/*.whl
