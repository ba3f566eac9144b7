#!/usr/bin/env bash
# Fill .whl/ with what the GPU machine lacks, for scripts/device-check.sh to install there
# (no network there): CPython 3.12 manylinux x86_64 wheels at the versions of quantpub's venv,
# a portable llama-cpp-python build, and llama.cpp's converter. Run here, with PyPI reachable.
#
#   VENV=/path/to/.venv bash scripts/device-wheels.sh      (default VENV: ./.venv)
#
# What the machine has is read from its image's package list (torch 2.11 cu130,
# transformers 5.17, accelerate, safetensors, tokenizers, numpy, pyarrow, ...); what it lacks
# is carried, pinned to VENV's versions. transformers is carried too (5.17 there): one tested
# version, and huggingface_hub 2.x beside it. Everything carried must stay well under the
# 64 MiB a device call may carry, repository included; the total is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY312=${PY312:-$(command -v python3.12 || ls -d /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1 || true)}
OUT=.whl
CACHE=${QUANTPUB_CACHE:-$HOME/.cache/quantpub}/device-wheels
LIMIT=$((64 << 20))
mkdir -p "$OUT" "$CACHE"
rm -f "$OUT"/*.whl "$OUT"/*.tar.gz

pin() {  # NAME -> NAME==VERSION as installed in VENV
    local v
    v=$("$VENV/bin/python" -c "import sys; from importlib.metadata import version; print(version(sys.argv[1]))" "$1") \
        || { echo "device-wheels: $1 is not installed in $VENV (run scripts/install.sh, or set VENV)" >&2; exit 2; }
    echo "$1==$v"
}

# 1. Binary wheels from PyPI for the machine's interpreter (CPython 3.12, glibc manylinux).
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_31 \
           manylinux_2_34 manylinux_2_35; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
FROM_PYPI=(transformers huggingface_hub httpx2 httpcore2 truststore click optimum datasets dill multiprocess gguf pydantic
           pydantic_core annotated-types typing-inspection torchao sentencepiece diskcache starlette uvicorn h11 nh3
           markdown-it-py)
pins=()
for name in "${FROM_PYPI[@]}"; do pins+=("$(pin "$name")"); done
echo "device-wheels: downloading ${#pins[@]} wheels for cp312 manylinux x86_64"
"$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT" "${pins[@]}"

# 2. GPTQModel and its helpers: PyPI has sdists only; pure-Python wheels, built once (pip caches them).
#    GPTQModel's wheel holds no compiled CUDA kernels (it JIT-compiles them on first use when nvcc is
#    there; scripts/device-check.sh turns that off).
for name in gptqmodel defuser tokenicer logbar device-smi; do
    "$VENV/bin/python" -m pip wheel --quiet --no-deps "$(pin "$name")" -w "$OUT"
done

# 3. PyPcre (GPTQModel needs it) has no cp312 wheel on PyPI: build it with a Python 3.12 here. It links
#    the system's libpcre2-8.so.0, which any glibc distribution has (grep uses it).
pcre=$(pin pypcre)
if ! ls "$CACHE"/pypcre-"${pcre#*==}"-cp312-*.whl >/dev/null 2>&1; then
    [ -n "$PY312" ] || { echo "device-wheels: PyPcre needs a Python 3.12 to build its cp312 wheel; set PY312" >&2; exit 2; }
    nice -n 5 "$PY312" -m pip wheel --quiet --no-deps "$pcre" -w "$CACHE"
fi
cp "$CACHE"/pypcre-"${pcre#*==}"-cp312-*.whl "$OUT"/

# 4. llama-cpp-python built portable (the venv's is -march=native): AVX2/FMA/F16C, no AVX-512, no llava.
#    It loads llama.cpp through ctypes, so one build serves every CPython. ~5+ minutes on 2 cores, once.
llama=$(pin llama-cpp-python)
if ! ls "$CACHE"/llama_cpp_python-"${llama#*==}"-*.whl >/dev/null 2>&1; then
    echo "device-wheels: building a portable $llama (several minutes, once)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        nice -n 10 "$VENV/bin/python" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "$llama" -w "$CACHE"
fi
# The wheel stores each library six times (zip has no symlinks: lib/ and llama_cpp/lib/, each as .so,
# .so.0 and .so.0.x.y) plus headers: keep what llama_cpp loads (llama_cpp/lib/libX.so) and the
# sonames the libraries ask for (libX.so.0).
"$VENV/bin/python" - "$CACHE"/llama_cpp_python-"${llama#*==}"-*.whl "$OUT" <<'PY'
import re, sys, zipfile
from pathlib import Path
src, out = Path(sys.argv[1]), Path(sys.argv[2])
def keep(name):
    return ".dist-info/" in name or name.startswith("llama_cpp/") and not re.search(r"\.so\.\d+\.", name)
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if not keep(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if keep(l.split(",")[0])).encode()
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
PY

# 5. llama.cpp's converter (only in the 76 MB sdist, over the carry limit): the extracted copy quantpub
#    caches (`quantpub doctor --fetch`), as a tarball that device-check.sh unpacks into QUANTPUB_CACHE.
conv=$(PYTHONPATH=src "$VENV/bin/python" -c "from quantpub.backends.llamacpp import converter_dir; print(converter_dir())")
tar -czf "$OUT/llama.cpp-converter-${llama#*==}.tar.gz" -C "$(dirname "$conv")" "$(basename "$conv")"

# 6. Every carried wheel's requirements must be met by another carried wheel or by the machine.
"$VENV/bin/python" scripts/device_closure.py "$OUT"

carried=$(du -cb "$OUT"/* | tail -1 | cut -f1)
repo=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
printf 'device-wheels: %d files, %.1f MiB in %s; repository %.1f MiB; total %.1f MiB of the %d MiB a call may carry\n' \
    "$(ls "$OUT" | wc -l)" "$(echo "$carried / 1048576" | bc -l)" "$OUT" "$(echo "$repo / 1048576" | bc -l)" \
    "$(echo "($carried + $repo) / 1048576" | bc -l)" $((LIMIT >> 20))
if [ $((carried + repo)) -gt $((LIMIT * 3 / 4)) ]; then
    echo "device-wheels: over three quarters of the limit; carry less" >&2
    exit 1
fi
