#!/usr/bin/env bash
# The GPU check: on a machine with one GPU and no network, a ~1B random-weight fp16 llama through
# `quantpub run` on CUDA (six GPTQ branches, AWQ, four GGUF types), with wall time, GPU busy
# fraction and peak GPU and host memory per stage (scripts/device_check.py does the work).
#
#   bash scripts/device-check.sh                 there, after `bash scripts/device-wheels.sh` here
#                                                filled .whl/ (carried to the machine)
#   bash scripts/device-check.sh --cpu-dry-run   here: the same flow on CPU with a tiny model, no wheels
#
# Results: $OUT/report.txt, $OUT/results.json, $OUT/logs.tar.gz ($OUT defaults to WORK/out).
# Exit status 1 when a stage or variant failed or the run overran the budget (DEVICE_CHECK_BUDGET).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEVICE_CHECK_STARTED=$(date +%s.%N) PYTHONUNBUFFERED=1
WORK=${DEVICE_CHECK_WORK:-/tmp/quantpub-device-check}
export DEVICE_CHECK_WORK=$WORK
mkdir -p "$WORK"

# GPTQModel's wheel ships its CUDA kernels as sources that it JIT-builds with nvcc on first use
# (BUILD_CUDA_EXT=0): keep its GPTQ block kernel off (the torch path quantizes) and let quantpub load
# variants with Triton kernels (validate.gptq_loader_kwargs, awq_loader_kwargs), so the check shows the path that needs no
# compiled CUDA kernel. Whatever GPTQModel still JIT-builds is listed in the report.
export GPTQMODEL_DISABLE_GPTQ_CUDA=1 TQDM_DISABLE=1

if [ "${1:-}" = "--cpu-dry-run" ]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    exec "$PYTHON" scripts/device_check.py --cpu-dry-run
fi

PYTHON=${PYTHON:-$(command -v python3)}
SITE=${DEVICE_CHECK_SITE:-/tmp/site}
ls .whl/*.whl >/dev/null 2>&1 || { echo "device-check: no wheels in .whl/: run scripts/device-wheels.sh here and carry .whl" >&2; exit 2; }
# What the machine lacks, as carried: no index, no dependency resolution (device_closure.py checked it).
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export QUANTPUB_CACHE=$WORK/cache
mkdir -p "$QUANTPUB_CACHE"
tar -xzf .whl/llama.cpp-converter-*.tar.gz -C "$QUANTPUB_CACHE"
export PYTHONPATH=$PWD/src:$SITE
# Offline (the run's own hub is on 127.0.0.1); JIT builds go to WORK/jit, where the report looks.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export GPTQMODEL_TORCH_EXTENSIONS_DIR=$WORK/jit TORCH_EXTENSIONS_DIR=$WORK/jit/torch
"$PYTHON" - <<'EOF'
import importlib, sys
missing = []
for name in ("quantpub", "gptqmodel", "optimum", "llama_cpp", "gguf", "pydantic", "starlette", "uvicorn",
             "nh3", "pcre", "torch", "transformers", "pynvml", "psutil"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{name}: {type(exc).__name__}: {exc}")
import torch
print(f"device-check: python {sys.version.split()[0]}, torch {torch.__version__}, CUDA "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NOT available'}")
if missing or not torch.cuda.is_available():
    print("device-check: cannot start:\n  " + "\n  ".join(missing or ["no CUDA device"]), file=sys.stderr)
    sys.exit(2)
EOF
exec "$PYTHON" scripts/device_check.py
