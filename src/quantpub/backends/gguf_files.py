"""The GGUF stage: convert once, quantize to every type in parallel, split, validate.

One 16-bit GGUF is made by llama.cpp's converter; every type is quantized from that single
file by ``llama_model_quantize``. An optional importance matrix is computed from the same
calibration samples as GPTQ (forward hooks on the HF model, mean squared input per column,
per expert for MoE) and passed to every type. Files larger than the hub's per-file limit are
re-written in llama.cpp's split format (``-00001-of-0000N.gguf``), which llama.cpp loads
from the first shard. Every file is read back (type mix, metadata) and evaluated by llama.cpp.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantpub import machine
from quantpub.backends import llamacpp
from quantpub.gguf_types import GgufVariant

log = logging.getLogger(__name__)
HUB_FILE_LIMIT = 50 * 1000 ** 3
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
FALLBACK_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16", "F32"}  # rows not divisible by 256
# GGUF type -> (the ggml type most block weights get, every type llama.cpp's mix may give a block weight)
TYPE_MIX: dict[str, tuple[str, set[str]]] = {
    "Q2_K": ("Q2_K", {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}),
    "Q3_K_S": ("Q3_K", {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}),
    "Q3_K_M": ("Q3_K", {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}),
    "Q3_K_L": ("Q3_K", {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}),
    "Q4_0": ("Q4_0", {"Q4_0", "Q4_1", "Q5_0", "Q6_K", "Q8_0"}),
    "Q4_1": ("Q4_1", {"Q4_1", "Q5_1", "Q6_K", "Q8_0"}),
    "Q4_K_S": ("Q4_K", {"Q4_K", "Q5_K", "Q6_K"}),
    "Q4_K_M": ("Q4_K", {"Q4_K", "Q5_K", "Q6_K"}),
    "Q5_0": ("Q5_0", {"Q5_0", "Q5_1", "Q6_K", "Q8_0"}),
    "Q5_1": ("Q5_1", {"Q5_1", "Q6_K", "Q8_0"}),
    "Q5_K_S": ("Q5_K", {"Q5_K", "Q6_K"}),
    "Q5_K_M": ("Q5_K", {"Q5_K", "Q6_K"}),
    "Q6_K": ("Q6_K", {"Q6_K"}),
    "Q8_0": ("Q8_0", {"Q8_0"}),
    "F16": ("F16", {"F16"}),
    "BF16": ("BF16", {"BF16"}),
}
NOT_QUANTIZED = ("ffn_gate_inp", "_norm")  # MoE routers and norms stay F32
EXPERT_LINEAR = re.compile(r"layers\.(?P<layer>\d+)\..*experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
EXPERT_GGUF = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
               "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
IQ_BASE = {"IQ2_M": "IQ2_S", "IQ3_M": "IQ3_S", "IQ3_XS": "IQ3_S"}  # the i-quant mixes named after their size


def expected_mix(gguf_type: str) -> tuple[str, set[str] | None]:
    """(base ggml type, allowed ggml types or None for any quantized type: the i-quant mixes vary by model)."""
    if gguf_type in TYPE_MIX:
        return TYPE_MIX[gguf_type]
    return IQ_BASE.get(gguf_type, gguf_type), None


@dataclass(frozen=True)
class Expectations:
    """What every file of one model must carry (from the source config and tokenizer)."""
    context_length: int
    rope_scaling: dict[str, Any] | None
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    metadata: dict[str, Any] = field(default_factory=dict)  # keys every file must carry with exactly these values


def sixteen_bit_type(config: dict) -> str:
    """bf16 for bf16 sources (same bits, no overflow); f16 for fp16 and fp32 sources (f16's
    10-bit mantissa loses less than bf16's 7 before quantizing to <= 8 bits)."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return "bf16" if "bfloat16" in dtype else "f16"


# importance matrix
@dataclass
class Imatrix:
    """Squared input activations per column of every block weight, as llama.cpp's imatrix file holds them.

    ``sums[name]`` is [matrices, columns] (one matrix per MoE expert) and ``counts[name]`` the
    tokens each matrix saw. An expert no calibration token reached gets its siblings' mean
    with a count of 1 (listed in ``record["experts_without_tokens"]``), so that the file gives
    llama-quantize exactly what quantpub used.
    """
    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    record: dict[str, Any]

    def values(self) -> dict[str, np.ndarray]:
        """What llama-quantize computes from the file (float32 sums / counts), flattened per tensor."""
        return {n: (self.sums[n] / self.counts[n][:, None]).ravel() for n in sorted(self.sums)}

    def write(self, path: Path, *, datasets: list[str], chunk_size: int) -> None:
        """llama.cpp's GGUF imatrix format (``llama-imatrix`` output, ``llama-quantize --imatrix`` input)."""
        import gguf

        writer = gguf.GGUFWriter(path, "llama")
        writer.add_string("general.type", "imatrix")
        writer.add_array("imatrix.datasets", datasets)
        writer.add_uint32("imatrix.chunk_count", self.record["samples"])
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(self.sums):
            writer.add_tensor(f"{name}.in_sum2", self.sums[name])
            writer.add_tensor(f"{name}.counts", self.counts[name][:, None])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_imatrix(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, values as llama-quantize computes them) of an imatrix file."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    data = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    values = {}
    for name in sorted(n.removesuffix(".in_sum2") for n in data if n.endswith(".in_sum2")):
        sums, counts = data[f"{name}.in_sum2"], np.round(data[f"{name}.counts"]).astype(np.float32).reshape(-1)
        values[name] = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 1).astype(np.float32).ravel()
    return meta, values


def compute_imatrix(model, samples: list[list[int]], n_layers: int) -> Imatrix:
    """Squared input activations per input column of every block linear, in GGUF tensor names.

    MoE experts (fused ``gate_up_proj``/``down_proj`` parameters) get one slice per expert from
    the tokens routed to it.
    """
    import gguf
    import torch

    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, n_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    hooks = []

    def add(name: str, x: torch.Tensor, n_experts: int = 1, expert: int = 0):
        x = x.reshape(-1, x.shape[-1]).double()
        if name not in sums:
            sums[name] = torch.zeros(n_experts, x.shape[-1], dtype=torch.float64)
            counts[name] = torch.zeros(n_experts, dtype=torch.float64)
        sums[name][expert] += (x * x).sum(0).cpu()
        counts[name][expert] += x.shape[0]

    n_experts = getattr(model.config, "num_local_experts", None) or 1
    for module_name, module in model.named_modules():
        expert = EXPERT_LINEAR.search(module_name)
        if isinstance(module, torch.nn.Linear) and expert:  # experts as separate Linears (GPTQModel's defuser)
            layer, e, proj = int(expert["layer"]), int(expert["expert"]), EXPERT_GGUF[expert["proj"]]
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, n=f"blk.{layer}.{proj}.weight", e=e: add(n, args[0], n_experts, e)))
        elif isinstance(module, torch.nn.Linear):
            gguf_name = names.get_name(module_name)
            if gguf_name is None or not gguf_name.startswith("blk."):
                continue
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, n=gguf_name + ".weight": add(n, args[0])))
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "num_experts"):
            layer = int(module_name.split("layers.")[1].split(".")[0])
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, i=layer: _expert_stats(m, args[0], args[1], i, add)))
    try:
        with torch.no_grad():
            for ids in samples:
                model(torch.tensor([ids], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    out_sums, out_counts, starved = {}, {}, []
    for name, total in sums.items():
        n = counts[name].clone()
        empty = (n == 0).nonzero().flatten().tolist()
        if empty:
            starved += [f"{name}[expert {e}]" for e in empty]
            seen = n > 0
            total[~seen] = (total[seen] / n[seen][:, None]).mean(0) if seen.any() else 1.0
            n[~seen] = 1
        out_sums[name] = total.float().numpy()
        out_counts[name] = n.float().numpy()
    record = {"tensors": len(out_sums), "samples": len(samples), "tokens": sum(len(s) for s in samples),
              "experts_without_tokens": starved}
    return Imatrix(out_sums, out_counts, record)


def _expert_stats(module, hidden, top_k_index, layer: int, add) -> None:
    import torch

    n = module.num_experts
    for e in range(n):
        rows = (top_k_index == e).any(-1).nonzero().flatten()
        if not len(rows):
            continue
        x = hidden[rows]
        add(f"blk.{layer}.ffn_gate_exps.weight", x, n, e)
        add(f"blk.{layer}.ffn_up_exps.weight", x, n, e)
        gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
        add(f"blk.{layer}.ffn_down_exps.weight", module.act_fn(gate) * up, n, e)


# reading back
def read(files: list[Path]) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...]]]]:
    """(metadata of the first shard, [(tensor name, ggml type, shape)] over all shards)."""
    import gguf

    meta: dict[str, Any] = {}
    tensors = []
    for i, path in enumerate(files):
        reader = gguf.GGUFReader(path)
        if i == 0:
            for key, field in reader.fields.items():
                if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "scores", "token_type",
                                                                                 "merges"):
                    meta[key] = len(field.data)
                    continue
                try:
                    meta[key] = field.contents()
                except Exception:  # noqa: BLE001 - keep what can be read
                    continue
        tensors += [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors]
    return meta, tensors


def type_mix(tensors) -> dict[str, int]:
    """Counts of ggml types over the quantized block weights (2-D ``blk.*`` tensors, routers excluded)."""
    return dict(Counter(kind for name, kind, shape in tensors
                        if name.startswith("blk.") and len(shape) > 1 and not any(s in name for s in NOT_QUANTIZED)))


def _forced(variant: GgufVariant, name: str) -> str | None:
    """The tensor type the variant's overrides give ``name``, as llama.cpp picks it (first match wins)."""
    if name == "token_embd.weight" and variant.token_embedding_type:
        return variant.token_embedding_type
    if name == "output.weight" and variant.output_tensor_type:
        return variant.output_tensor_type
    return next((kind for pattern, kind in variant.overrides() if re.search(pattern, name)), None)


def check_mix(variant: GgufVariant | str, tensors) -> list[str]:
    """Problems with the tensor types of a file quantized as ``variant`` (empty when right)."""
    variant = GgufVariant.model_validate(variant)
    base, allowed = expected_mix(variant.type)
    problems = []
    aligned = Counter()
    blocks = 0
    for name, kind, shape in tensors:
        if len(shape) == 1 or any(s in name for s in NOT_QUANTIZED):
            if kind != "F32":
                problems.append(f"{name} is {kind}, expected F32")
            continue
        forced = _forced(variant, name)
        if forced is not None:
            ok = kind == forced or (shape[0] % 256 != 0 and kind in FALLBACK_TYPES and forced not in FALLBACK_TYPES)
            if not ok:
                problems.append(f"{name} is {kind}, but the variant sets it to {forced}")
            continue
        blocks += name.startswith("blk.")
        if allowed is None:
            ok = kind not in ("F32", "F16", "BF16")
        elif shape[0] % 256:
            ok = kind in allowed | FALLBACK_TYPES and kind not in K_TYPES
        else:
            ok = kind in allowed or (name in ("token_embd.weight", "output.weight") and kind in {"Q8_0", "Q6_K"})
        if shape[0] % 256 == 0 and name.startswith("blk."):
            aligned[kind] += 1
        if not ok:
            problems.append(f"{name} is {kind}, not one of {sorted(allowed) if allowed else 'the quantized types'}")
    # The majority rule only means something when most block weights can take the type: on models
    # whose rows are mostly not multiples of 256 (SmolLM2: 576) the aligned few are the ones
    # llama.cpp's mixes upgrade on purpose (ffn_down). Overridden tensors are not counted.
    if aligned and 2 * sum(aligned.values()) >= blocks and aligned.most_common(1)[0][0] != base:
        problems.append(f"most block weights are {aligned.most_common(1)[0][0]}, expected {base}: {dict(aligned)}")
    return problems


def check_metadata(meta: dict[str, Any], gguf_type: str, expect: Expectations) -> list[str]:
    """Problems with a file's metadata (``gguf_type``: llama.cpp's file type, Q4_K_M for a Q4_K_L)."""
    arch = meta.get("general.architecture")
    problems = []

    def want(key: str, value, close: bool = False):
        got = meta.get(key)
        same = got is not None and (math.isclose(float(got), float(value), rel_tol=1e-6) if close else got == value)
        if not same:
            problems.append(f"{key} is {got!r}, expected {value!r}")

    want("general.file_type", llamacpp.ftype(gguf_type))
    want(f"{arch}.context_length", expect.context_length)
    if expect.rope_scaling:
        want(f"{arch}.rope.scaling.type", expect.rope_scaling.get("rope_type") or expect.rope_scaling.get("type"))
        want(f"{arch}.rope.scaling.factor", expect.rope_scaling["factor"], close=True)
    if expect.chat_template:
        want("tokenizer.chat_template", expect.chat_template)
    if expect.bos_token_id is not None:
        want("tokenizer.ggml.bos_token_id", expect.bos_token_id)
    if expect.eos_token_id is not None:
        want("tokenizer.ggml.eos_token_id", expect.eos_token_id)
    for key, value in expect.metadata.items():
        want(key, value)
    return problems


def split(path: Path, max_bytes: int) -> list[Path]:
    """Re-write ``path`` as llama.cpp split shards of at most ``max_bytes`` of tensor data each."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(path, arch, split_max_size=max_bytes)
    for key in reader.fields.values():
        if key.name == "general.architecture" or key.name.startswith("GGUF."):
            continue
        kind = key.types[0]
        sub = key.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.name, key.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    shards = writer.format_shard_names(path)
    if len(shards) == 1:
        return [path]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    del reader
    path.unlink()
    return shards


# evaluation through llama.cpp
def validate_file(first_file: Path, text: str, n_tokens: int, threads: int) -> dict[str, Any]:
    """Load with llama.cpp, evaluate ``n_tokens`` of ``text``: perplexity and logit sanity."""
    llm = llamacpp.load(first_file, n_ctx=n_tokens + 8, n_batch=n_tokens + 8, logits_all=True, n_threads=threads,
                        verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True)[:n_tokens]
        if len(tokens) < 16:
            raise llamacpp.LlamaCppError(f"validation text gives only {len(tokens)} tokens")
        llm.eval(tokens)
        stats = logit_stats(llm.scores[: len(tokens)], tokens)
        n_vocab = llm.n_vocab()
    finally:
        llm.close()
    return {"loaded_with": "llama_cpp.Llama", "tokens": len(tokens), **stats, "n_vocab": n_vocab}


def logit_stats(scores: np.ndarray, tokens: list[int], rows: int = 32) -> dict[str, Any]:
    """Whether every logit is finite, their standard deviation and the perplexity of ``tokens``.

    Read ``rows`` positions at a time in float64: a whole float64 copy of 256 positions of a
    49k vocabulary and its log-softmax took ~350 MB, more than the model being checked.
    """
    count, mean, m2, nll = 0, 0.0, 0.0, 0.0  # Chan's pairwise combination of block means and squared deviations
    for start in range(0, len(tokens), rows):
        block = np.asarray(scores[start:start + rows], dtype=np.float64)
        if not np.isfinite(block).all():
            return {"finite": False, "logit_std": float("nan"), "perplexity": float("nan")}
        n, block_mean = block.size, float(block.mean())
        block_m2 = float(np.square(block - block_mean).sum())
        delta, total = block_mean - mean, count + n
        mean, m2, count = mean + delta * n / total, m2 + block_m2 + delta * delta * count * n / total, total
        predicting = block[: len(tokens) - 1 - start]  # every position but the last predicts the next token
        if len(predicting):
            top = predicting.max(-1)
            log_sum = top + np.log(np.exp(predicting - top[:, None]).sum(-1))
            nll += float((log_sum - predicting[np.arange(len(predicting)), tokens[start + 1:start + 1 + len(predicting)]]).sum())
    return {"finite": True, "logit_std": float(np.sqrt(m2 / count)), "perplexity": float(np.exp(nll / (len(tokens) - 1)))}


def garbage(result: dict[str, Any], reference: dict[str, Any] | None) -> str | None:
    """Why the evaluation looks broken (NaN, constant logits, far worse than the 16-bit file), or None."""
    if not result["finite"]:
        return "llama.cpp produced NaN or infinite logits"
    if result["logit_std"] < 1e-6:
        return "llama.cpp produced constant logits"
    if reference and reference["finite"] and result["perplexity"] > 10 * reference["perplexity"]:
        return (f"perplexity {result['perplexity']:.1f} is more than 10x the 16-bit file's "
                f"{reference['perplexity']:.1f}")
    return None


def workers_for(n_jobs: int, source_bytes: int) -> int:
    """Parallel quantizations: one per core, as many as memory allows (each holds ~2 tensors in f32)."""
    cores = machine.cpu_count()
    try:
        available = machine.available_memory()
    except (ValueError, OSError):
        available = 8 << 30
    per_job = (1 << 30) + source_bytes // 4  # buffers + page cache of the 16-bit file shared; generous
    return max(1, min(n_jobs, cores, available // per_job))
