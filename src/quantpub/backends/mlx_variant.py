"""MLX variants (Apple's runtime; mlx-community's repos): built by ``mlx_lm.convert``, checked by mlx-lm.

``mlx_lm.convert(quantize=True, q_bits, q_group_size)`` rounds every linear and embedding
layer (the output layer too) to ``bits`` with an affine grid per group of ``group_size``
columns (a 16-bit scale and bias per group), data-free, and writes ``model.safetensors``,
``config.json`` (with ``quantization``) and the tokenizer, as mlx-community's repos hold them.
On Linux this runs on the CPU build of MLX (``mlx`` + ``mlx-cpu``): the same files as on a
Mac, computed on the CPU. Unquantized tensors are kept in the source's 16-bit dtype (bf16 for
a bf16 source, fp16 otherwise), as quantpub's other formats keep them.

Checks run on the CPU compute in float32 (``_load``): MLX's CPU backend runs 16-bit models about
30x slower (a 64-token forward of SmolLM2-135M 4-bit: 267 s in fp16, 8 s in fp32). The quantized
weights are untouched (only the 16-bit scales, biases and norms are widened, exactly); a Mac computes
in the file's 16-bit dtype, so its logits differ from these by 16-bit rounding.

Every function takes plain arguments, for the backend table to register:
``build``, ``validate``, ``logprobs``, ``estimated_size``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantpub.backends.conform import source_dtype, tokenizer_files, with_legacy_rope
from quantpub.calibration import CalibrationSet
from quantpub.matrix_formats import MlxTarget
from quantpub.source import ModelFacts

log = logging.getLogger(__name__)
PROMPT_TOKENS = 16
NEW_TOKENS = 4
SCALE_BYTES = 2  # scales and biases in the model's 16-bit dtype


def versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("mlx", "mlx-lm", "mlx-cpu") if _installed(name)}


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def manifest_parameters(params: MlxTarget) -> dict[str, Any]:
    """The parameters a manifest records (and the card shows)."""
    return {"bits": params.bits, "group_size": params.group_size}


def build(source_dir: Path, out_dir: Path, params: MlxTarget, calib: CalibrationSet | None = None,
          device: str = "cpu") -> dict[str, Any]:
    """``mlx_lm.convert`` the source into ``out_dir`` (must not exist); returns a record.

    ``calib`` and ``device`` are accepted for the common builder signature and unused:
    MLX's quantization is data-free and runs where MLX runs (the CPU here).
    """
    from mlx_lm import convert

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    dtype = source_dtype(json.loads((source_dir / "config.json").read_text()))
    started = time.monotonic()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # mlx_lm.convert reports progress with print()
        convert(str(source_dir), str(out_dir), quantize=True, q_bits=params.bits, q_group_size=params.group_size,
                dtype=dtype)
    for line in printed.getvalue().splitlines():
        log.info("mlx_lm.convert: %s", line)
    _ship_source_tokenizer(out_dir, source_dir)
    config = with_legacy_rope(json.loads((out_dir / "config.json").read_text()))  # mlx-lm reads rope_theta only
    (out_dir / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return {"bits": params.bits, "group_size": params.group_size, "dtype": dtype,
            "quantization": config.get("quantization"), "seconds": round(time.monotonic() - started, 2),
            "versions": versions()}


def _ship_source_tokenizer(out_dir: Path, source_dir: Path) -> None:
    """The source's tokenizer files byte for byte (mlx-lm re-serialises them), and no README: the card is quantpub's."""
    import shutil

    (out_dir / "README.md").unlink(missing_ok=True)
    for name in tokenizer_files(out_dir):
        if not (source_dir / name).is_file():
            (out_dir / name).unlink()
    for name in tokenizer_files(source_dir):
        shutil.copyfile(source_dir / name, out_dir / name)


def _load(out_dir: Path):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(out_dir))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    return model


def validate(out_dir: Path, params: MlxTarget, prompt_ids: list[int]) -> dict[str, Any]:
    """Load with ``mlx_lm.load``, forward ``prompt_ids``, generate 4 greedy tokens; raises ``ValueError`` on failure."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.generate import generate_step

    started = time.monotonic()
    try:
        model = _load(out_dir)
        ids = prompt_ids[:PROMPT_TOKENS]
        logits = model(mx.array([ids]))
        finite = bool(mx.all(mx.isfinite(logits)).item())
        tokens = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=NEW_TOKENS)]
    except Exception as exc:
        raise ValueError(f"{Path(out_dir).name}: mlx-lm could not run it: {type(exc).__name__}: {exc}") from exc
    if not finite:
        raise ValueError(f"{Path(out_dir).name}: the forward pass produced NaN or infinite logits")
    bits = json.loads((Path(out_dir) / "config.json").read_text()).get("quantization", {}).get("bits")
    if bits != params.bits:
        raise ValueError(f"{Path(out_dir).name}: config.json says {bits}-bit, the matrix asked for {params.bits}")
    return {"validated": True, "loaded_with": "mlx_lm.load", "device": str(mx.default_device()),
            "compute_dtype": str(next(v.dtype for _, v in tree_flatten(model.parameters()) if v.dtype != mx.uint32)),
            "prompt_tokens": len(ids), "generated_tokens": tokens, "seconds": round(time.monotonic() - started, 2)}


def logprobs(out_dir: Path, windows: list[list[int]]) -> Iterator[np.ndarray]:
    """Log-probabilities of every window through mlx-lm (fp32 logits), for ``evaluate.score``."""
    import mlx.core as mx

    from quantpub.evaluate import _log_softmax

    model = _load(out_dir)
    for window in windows:
        logits = np.array(model(mx.array([window]))[0].astype(mx.float32))
        yield _log_softmax(logits.astype(np.float64))


def estimated_size(facts: ModelFacts, params: MlxTarget) -> int:
    """Bytes of ``model.safetensors``: every linear and embedding matrix whose input size divides into
    groups is packed (``bits`` per weight, a 16-bit scale and bias per group), the rest in 16 bits.

    Exact for the tensors; the safetensors header (about 5 KB on the tiny llama, 0.5% of its
    4-bit file; a few hundred KB on a 7B) is not counted.
    """
    def matrix(rows: int, cols: int) -> int:
        if cols % params.group_size:
            return rows * cols * 2
        return rows * cols * params.bits // 8 + rows * (cols // params.group_size) * 2 * SCALE_BYTES

    block = sum(matrix(lin.out_features, lin.in_features) * lin.count for lin in facts.block_linears())
    if facts.num_experts > 1:
        block += matrix(facts.num_experts, facts.hidden_size)  # the router is a linear layer too
    embed = matrix(facts.vocab_size, facts.hidden_size)
    head = 0 if facts.tie_word_embeddings else embed
    norms = (2 * facts.num_layers + 1) * facts.hidden_size * 2
    return block * facts.num_layers + embed + head + norms
