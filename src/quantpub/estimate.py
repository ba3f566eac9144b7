"""Size and memory estimates, from the config alone (no weights).

Sizes follow the on-disk layouts exactly (AutoGPTQ v1 / AutoAWQ tensors, 16-bit for what is
not quantized); GGUF sizes use llama.cpp's effective bits per weight for each type's tensor
mix, so they are estimates. Memory is what layer-by-layer quantization holds at its peak;
all numbers are in bytes.
"""

from __future__ import annotations

from quantpub.gguf_types import FILE_BITS_PER_WEIGHT, TENSOR_BITS_PER_WEIGHT, GgufVariant
from quantpub.source import ModelFacts, groups

FP16 = 2
FP32 = 4
GIB = 1 << 30
# torch + transformers (+ GPTQModel) imported in a CPU worker: 0.45-0.53 GB measured (benchmarks/memory.py).
LIBRARIES = 500 * 1000 ** 2


def gptq_size(facts: ModelFacts, bits: int, group_size: int | None) -> int:
    """Bytes of ``model.safetensors`` in the AutoGPTQ v1 layout.

    Per linear layer: qweight (bits per weight), qzeros (bits per group and column),
    fp16 scales (per group and column), int32 g_idx (per input row).
    """
    total = 0
    for lin in facts.block_linears():
        g = groups(lin.in_features, group_size)
        per = (lin.in_features * lin.out_features * bits // 8
               + g * lin.out_features * bits // 8
               + g * lin.out_features * FP16
               + lin.in_features * 4)
        total += per * lin.count
    return total * facts.num_layers + facts.unquantized_params * FP16


def awq_size(facts: ModelFacts, bits: int, group_size: int) -> int:
    """Bytes of an AutoAWQ checkpoint: qweight, qzeros and fp16 scales; no g_idx."""
    total = 0
    for lin in facts.block_linears():
        g = groups(lin.in_features, group_size)
        per = lin.in_features * lin.out_features * bits // 8 + g * lin.out_features * (bits // 8 + FP16)
        total += per * lin.count
    return total * facts.num_layers + facts.unquantized_params * FP16


def gguf_size(facts: ModelFacts, variant: GgufVariant) -> int:
    """The type's average bits per weight, with forced embedding/output types counted at theirs
    (``--tensor-type`` overrides are not counted: which tensors a pattern hits is known only
    to llama.cpp)."""
    bits = FILE_BITS_PER_WEIGHT[variant.type]
    total = facts.total_params * bits
    embed = facts.vocab_size * facts.hidden_size
    head = 0 if facts.tie_word_embeddings else embed
    for forced, params in ((variant.token_embedding_type, embed), (variant.output_tensor_type, head)):
        if forced:
            total += params * (TENSOR_BITS_PER_WEIGHT[forced] - bits)
    return int(total / 8)


def gptq_variant_size(facts: ModelFacts, params) -> int:
    return gptq_size(facts, params.bits, params.group_size)


def awq_variant_size(facts: ModelFacts, params) -> int:
    return awq_size(facts, params.bits, params.group_size)


def session_memory(facts: ModelFacts, *, n_samples: int, seq_len: int, device: str, hessians: bool
                   ) -> tuple[int | None, int, int]:
    """(accelerator bytes or None on CPU, host bytes, host bytes when streamed) of a variant built on a
    loaded model (GPTQ: ``hessians``; AWQ: its scale search's activations instead)."""
    dtype_bytes = FP16 if device == "cuda" else FP32
    dev, host = layerwise_quantize_memory(facts, n_samples=n_samples, seq_len=seq_len, dtype_bytes=dtype_bytes,
                                          hessians=hessians)
    streamed = streamed_host_memory(facts, dtype_bytes=dtype_bytes, cpu_work=dev if device == "cpu" else None)
    if device == "cpu":
        return None, host + dev, streamed
    return dev, host, streamed


def layerwise_quantize_memory(
    facts: ModelFacts, *, n_samples: int, seq_len: int, dtype_bytes: int, hessians: bool
) -> tuple[int, int]:
    """(accelerator bytes, host bytes) at the peak of layer-by-layer GPTQ or AWQ.

    The accelerator holds one decoder block, the fp32 Hessians of its linear layers (GPTQ)
    or one block's worth of extra activations for the scale search (AWQ), the block's inputs
    and outputs for every calibration sample, and one sample's MLP activations. The host
    holds the whole model in ``dtype_bytes`` while blocks move through the accelerator.
    """
    linears = facts.block_linears()
    block = _block_bytes(facts, dtype_bytes)
    acts = 2 * n_samples * seq_len * facts.hidden_size * dtype_bytes
    mlp = 3 * seq_len * facts.intermediate_size * dtype_bytes * facts.experts_per_token
    if hessians:
        extra = sum(l.in_features ** 2 * FP32 * l.count for l in linears)
    else:
        extra = n_samples * seq_len * facts.intermediate_size * dtype_bytes
    device = block + acts + mlp + extra
    host = facts.total_params * dtype_bytes + GIB
    return device, host


def _block_bytes(facts: ModelFacts, dtype_bytes: int) -> int:
    """One decoder block's linear weights in ``dtype_bytes``."""
    return sum(l.in_features * l.out_features * l.count for l in facts.block_linears()) * dtype_bytes


def streamed_host_memory(facts: ModelFacts, *, dtype_bytes: int, cpu_work: int | None) -> int:
    """Host bytes at the peak of layer-by-layer GPTQ or AWQ that streams the model from its checkpoint.

    GPTQModel's lazy loading keeps the model on the meta device and reads a decoder block from
    the mmapped safetensors when its turn comes; quantized blocks go to disk. While quantizing,
    the host holds the libraries, the embeddings and output layer, two blocks (the one being
    quantized and the one being written) and, on CPU, the work the accelerator would hold
    (``cpu_work``: ``layerwise_quantize_memory``'s device bytes; None on a GPU). Once a variant is
    built, a child process loads it in another runtime's venv (``quantpub.compat``), beside the
    worker: on CPU its libraries plus the model at about 16 bits (0.8 GB measured for a 170M
    model); on a GPU the model goes to the GPU and the host holds the libraries and the CUDA
    context (1 GiB, not measured). Checkpoint pages the kernel maps in are page cache, which it
    drops under pressure.
    """
    block = _block_bytes(facts, dtype_bytes)
    held = (GIB if cpu_work is None else LIBRARIES) + facts.unquantized_params * dtype_bytes + 2 * block
    if cpu_work is None:
        return held + GIB
    return held + max(cpu_work, LIBRARIES + facts.total_params * FP16)


def convert_memory(facts: ModelFacts, device: str) -> int:
    """Host bytes of a data-free conversion (FP8, MLX): the source model loaded and its converted copy beside it,
    with the libraries."""
    return facts.total_params * (FP32 if device == "cpu" else FP16) * 2 + LIBRARIES


def gguf_memory(facts: ModelFacts) -> int:
    """Host bytes for convert + quantize: a few copies of the largest tensor in fp32."""
    return 3 * facts.largest_tensor_params * FP32 + GIB


def session_group_memory(plan, jobs, device: str, stream: bool = False) -> int:
    """Peak host bytes of the model-session stage (GPTQ/AWQ) for ``jobs``: its largest variant's.

    ``stream``: the model is read layer by layer from the checkpoint.
    """
    return max((j.stream_host_memory or j.host_memory) if stream else j.host_memory for j in jobs)


def gguf_group_memory(plan, jobs, device: str, stream: bool = False) -> int:
    """Peak host bytes of the GGUF stage: conversion and quantization, or the importance matrix's model."""
    facts = plan.facts
    peak = gguf_memory(facts)
    if any(j.variant.calibration is not None for j in jobs):  # the importance matrix loads the model
        libraries = LIBRARIES if device == "cpu" else GIB  # a CUDA context adds host memory: not measured here
        peak = max(peak, facts.total_params * (FP32 if device == "cpu" else FP16) + libraries)
    return peak


def evaluation_host_memory(plan, device: str) -> int:
    """Peak host bytes of evaluation: one model at a time, plus the cached reference log-probabilities."""
    facts = plan.facts
    spec = plan.matrix.evaluation
    reference = spec.windows * spec.context * facts.vocab_size * FP16
    one_window = 3 * spec.context * facts.vocab_size * 8  # float64 logits, log-softmax and a temporary
    weights = facts.total_params * (FP32 if device == "cpu" else FP16)
    return weights + reference + one_window + GIB
