"""llama.cpp through llama-cpp-python: its HF->GGUF converter, its quantizer, its loader.

The quantizer (``llama_model_quantize``) and loader are in the installed wheel. The converter
(``convert_hf_to_gguf.py`` with its ``conversion/`` modules and its own ``gguf-py``) is only in
the package's sdist, at the same llama.cpp commit; it is fetched once from the package index at
the installed version (or read from ``$QUANTPUB_LLAMA_CPP_SDIST``) and cached under
``~/.cache/quantpub`` (``$QUANTPUB_CACHE``). Nothing of llama.cpp is kept in this repository.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from quantpub.errors import QuantpubError
from quantpub.gguf_types import GgufVariant

log = logging.getLogger(__name__)
PACKAGE = "llama-cpp-python"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


class LlamaCppError(QuantpubError):
    """llama.cpp is missing, or one of its steps failed."""


def version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise LlamaCppError(f"{PACKAGE} is not installed: run scripts/install.sh (it builds and caches the wheel)") \
            from None


def commit() -> str:
    """llama.cpp's commit as the loaded library reports it (``ggml_commit``: ``0c1e570``, with
    ``-dirty`` when the package built it from a modified tree), or "unknown" for a library
    without that function."""
    from llama_cpp import llama_cpp as lib

    try:
        func = lib._lib.ggml_commit
    except AttributeError:
        return "unknown"
    func.restype = ctypes.c_char_p
    return (func() or b"unknown").decode()


# ggml's names for the CPU features a build was compiled for (``llama_print_system_info``) -> Linux's cpuinfo flags
CPU_FLAGS = {"SSE3": "pni", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
             "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
             "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8", "NEON": "asimd",
             "SVE": "sve", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm"}


def system_info() -> dict[str, str]:
    """What the loaded llama.cpp library was compiled for: ``{"AVX2": "1", "REPACK": "1", ...}`` (its CPU
    backend's part of ``llama_print_system_info``)."""
    import llama_cpp

    text = llama_cpp.llama_print_system_info().decode(errors="replace")
    found = {}
    for part in text.split("|"):
        key, eq, value = part.rpartition("=")
        if eq:
            found[key.split(":")[-1].strip()] = value.strip()
    return found


def build_cpu_features() -> list[str]:
    """The CPU features the loaded library's code uses unconditionally (a CPU without one gets SIGILL)."""
    return [k for k, v in system_info().items() if k in CPU_FLAGS and v == "1"]


def missing_cpu_features() -> list[str]:
    """Features the library was built for that this CPU lacks (empty where the CPU's flags cannot be read)."""
    from quantpub.machine import cpu_flags

    flags = cpu_flags()
    return [f for f in build_cpu_features() if flags and CPU_FLAGS[f] not in flags]


def extra_buffer_types() -> bool:
    """Whether quantpub's loads let llama.cpp use its extra weight buffer types.

    They are the AMX buffer (built only with AMX, i.e. ``-march=native`` on a Sapphire Rapids or
    later Xeon: ``ggml-cpu/amx``; llama.cpp issue 20824 is its SIGSEGV in ``llama_decode`` for
    quantized files) and the repack buffer (Q4_0/IQ4_NL rows interleaved for AVX2/NEON). The
    portable build has no AMX code, so the repack buffer stays on; a library built with AMX gets
    ``use_extra_bufts=False`` (which turns off both).
    """
    return system_info().get("AMX_INT8") != "1"


def load(path: Path, **kwargs):
    """``llama_cpp.Llama(model_path=path, **kwargs)``, with extra buffer types as ``extra_buffer_types`` says.

    ``Llama`` takes its model parameters from ``llama_model_default_params()`` and has no argument
    for ``use_extra_bufts``, so the defaults are adjusted for the load when the build has AMX.
    """
    import llama_cpp
    from llama_cpp import Llama

    if extra_buffer_types():
        return Llama(model_path=str(path), **kwargs)
    lib = llama_cpp.llama_cpp
    defaults = lib.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_bufts
    try:
        return Llama(model_path=str(path), **kwargs)
    finally:
        lib.llama_model_default_params = defaults


def cache_root() -> Path:
    return Path(os.environ.get("QUANTPUB_CACHE") or Path.home() / ".cache" / "quantpub")


def converter_dir(fetch: bool = True) -> Path:
    """The cached converter for the installed llama-cpp-python version, fetched on first use."""
    target = cache_root() / f"llama.cpp-{version()}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    if not fetch:
        raise LlamaCppError(f"the llama.cpp converter is not cached in {target}; run `quantpub doctor --fetch`")
    with tempfile.TemporaryDirectory(prefix="quantpub-sdist-") as tmp:
        sdist = os.environ.get("QUANTPUB_LLAMA_CPP_SDIST")
        if not sdist:
            log.info("fetching the %s %s sdist for llama.cpp's converter (once)", PACKAGE, version())
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                   ":all:", f"{PACKAGE}=={version()}", "-d", tmp], capture_output=True, text=True)
            found = list(Path(tmp).glob("*.tar.gz"))
            if done.returncode or not found:
                raise LlamaCppError(f"could not download the {PACKAGE} {version()} sdist: {done.stderr.strip()[-500:]}; "
                                    "on an offline machine set QUANTPUB_LLAMA_CPP_SDIST to a local copy")
            sdist = found[0]
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/vendor/llama.cpp/", 1)
                if len(rel) == 2 and any(rel[1] == p or rel[1].startswith(p) for p in CONVERTER_PARTS):
                    member.name = rel[1]
                    tar.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise LlamaCppError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process cached it first
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
    return target


def convert(model_dir: Path, outfile: Path, outtype: str, metadata: dict[str, str] | None = None) -> float:
    """Run llama.cpp's converter once: HF checkpoint -> one 16-bit GGUF. Returns seconds.

    ``metadata``: ``general.*`` keys for the converter's ``--metadata`` override file
    (``general.name``, ``general.quantized_by``, ``general.repo_url``, ``general.url``, ...).
    """
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)]),
           "NO_LOCAL_GGUF": ""}
    started = time.monotonic()
    partial = outfile.with_name(outfile.name + ".partial")
    extra = []
    if metadata:
        override = outfile.with_name(outfile.name + ".metadata.json")
        override.write_text(json.dumps(metadata, indent=2) + "\n")
        extra = ["--metadata", str(override)]
    done = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile",
                           str(partial), "--outtype", outtype, *extra],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        partial.unlink(missing_ok=True)
        raise LlamaCppError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{done.stderr.strip()[-2000:]}")
    os.replace(partial, outfile)
    return time.monotonic() - started


def ftype(gguf_type: str) -> int:
    """llama.cpp's number for a file type (``Q4_K_M``)."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}", None)
    if value is None:
        raise LlamaCppError(f"llama.cpp {version()} has no quantization type {gguf_type}")
    return value


GGML_BF16 = 30  # ggml.h's GGML_TYPE_BF16; llama-cpp-python 0.3.36 does not export it


def ggml_type(tensor_type: str) -> int:
    """ggml's number for a tensor type (``Q8_0``), as ``llama-quantize --tensor-type`` parses it."""
    import llama_cpp

    value = GGML_BF16 if tensor_type == "BF16" else getattr(llama_cpp, f"GGML_TYPE_{tensor_type}", None)
    if value is None:
        raise LlamaCppError(f"llama.cpp {version()} has no tensor type {tensor_type}")
    return value


def quantize_file(source: Path, dest: Path, variant: GgufVariant, *, imatrix: dict[str, np.ndarray] | None = None,
             threads: int = 1, kv: dict[str, str | int] | None = None) -> float:
    """``llama_model_quantize`` (the code behind ``llama-quantize``), with the variant's
    ``--token-embedding-type``, ``--output-tensor-type`` and ``--tensor-type`` overrides. Returns seconds.

    ``kv``: metadata written into the output the way ``llama-quantize`` writes its
    ``quantize.imatrix.*`` keys (``params.kv_overrides``: strings, and ints stored as uint32).
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(variant.type)
    params.nthread = threads
    keep: list = []  # the C side reads these during the call
    if variant.token_embedding_type:
        params.token_embedding_type = ggml_type(variant.token_embedding_type)
    if variant.output_tensor_type:
        params.output_tensor_type = ggml_type(variant.output_tensor_type)
    if variant.tensor_types:
        pairs = variant.overrides()
        table = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()
        for i, (pattern, kind) in enumerate(pairs):
            table[i].pattern = pattern.encode()
            table[i].type = ggml_type(kind)
        table[len(pairs)].pattern = None
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(table)
    if kv:
        overrides = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()  # zeroed: the last one ends the list
        for o, (key, value) in zip(overrides, kv.items()):
            o.key = key.encode()
            if isinstance(value, int):
                o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
            else:
                o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, str(value).encode()[:127]
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep.append(overrides)
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    started = time.monotonic()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        dest.unlink(missing_ok=True)
        if shutil.disk_usage(dest.parent).free < (16 << 20):  # llama.cpp only says it failed; say why
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))
        raise LlamaCppError(f"llama_model_quantize({source.name} -> {variant.describe()}) returned {rc}")
    return time.monotonic() - started


def doctor(fetch: bool = False) -> dict[str, str]:
    """What is installed and where: the ``quantpub doctor`` report."""
    report = {}
    for dist in ("torch", "transformers", "gptqmodel", "optimum", "huggingface_hub", "gguf", PACKAGE, "ray"):
        try:
            report[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            report[dist] = "not installed"
    from quantpub import machine

    flags = machine.cpu_flags()
    report["cpu"] = f"{machine.cpu_model()}, {machine.cpu_count()} cores"
    report["cpu features"] = " ".join(sorted(f for f in flags if f in set(CPU_FLAGS.values()) | {"amx_tile", "amx_bf16"}))
    try:
        import llama_cpp

        report["llama_cpp library"] = str(Path(llama_cpp.__file__).parent / "lib")
        built = build_cpu_features()
        missing = missing_cpu_features()
        libs = sorted(p.name for p in (Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so"))
        report["llama.cpp CPU backend"] = (f"{', '.join(libs) or 'built into libggml'}, compiled for "
                                          f"{' '.join(built) or 'the baseline'}")
        report["llama.cpp on this CPU"] = (f"MISSING {' '.join(missing)}: it would die with SIGILL; rebuild the wheel "
                                          "here (scripts/llama-wheel.sh)" if missing else "every feature it needs is here")
        report["extra buffer types"] = ("on (repack; no AMX code in this build)" if extra_buffer_types() else
                                       "off: this build has AMX (llama.cpp issue 20824), loads pass use_extra_bufts=False")
        report["llama.cpp converter"] = str(converter_dir(fetch=fetch))
    except QuantpubError as exc:
        report["llama.cpp converter"] = f"missing: {exc}"
    except ImportError as exc:
        report["llama_cpp library"] = f"cannot import: {exc}"
    try:
        import torch

        report["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except ImportError:
        report["cuda"] = "torch not installed"
    report["cache"] = str(cache_root())
    report["free disk in cache"] = f"{shutil.disk_usage(cache_root() if cache_root().exists() else Path.home()).free / 1e9:.1f} GB"
    return report
