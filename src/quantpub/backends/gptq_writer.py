"""Pack and write a GPTQ variant layer by layer: packed tensors to a spool file, then ``model.safetensors``.

The shared pass packs each layer's linears for every variant as soon as they are solved; the
bytes go to the variant's spool file at once, so no variant's weights are held in memory. At
the end GPTQModel's streaming writer (``streaming_state_dict_to_shards``, what its own save
uses) copies them, with the model's unquantized tensors, into ``model.safetensors`` (shards
of 4 GiB plus an index beyond that, as GPTQModel's save does) and the spool is deleted.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

SPOOL = ".packed-tensors.spool"
MAX_SHARD_BYTES = 4 * 1024**3  # GPTQModel's DEFAULT_MAX_SHARD_SIZE ("4GB", read as GiB)


class Spool:
    """Raw tensor bytes appended to one file, with where each tensor lies."""

    def __init__(self, path: Path):
        self.path = path
        self.modules: dict[str, dict[str, Any]] = {}  # module name -> {tensor name: TensorSource}
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def add(self, module: str, tensors: dict[str, Any]) -> None:
        """Append one packed module's tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``)."""
        import torch
        from gptqmodel.utils.model import OffloadTensorRef, TensorSource

        entries = {}
        with self._lock:
            for key, tensor in tensors.items():
                tensor = tensor.detach().cpu().contiguous()
                data = tensor.reshape(-1).view(torch.uint8).numpy()
                start = self._file.tell()
                self._file.write(memoryview(data))
                name = f"{module}.{key}"
                shape = tuple(tensor.shape)
                ref = OffloadTensorRef(str(self.path), tensor.dtype, shape, "dat", data_offsets=(start, start + data.nbytes))
                entries[name] = TensorSource(name, tensor.dtype, shape, ref)
            self.modules[module] = entries

    def close(self) -> None:
        self._file.close()


def pack_kernel(qcfg):
    """The quantized-linear class GPTQModel packs GPTQ variants with (its torch kernel)."""
    from gptqmodel.quantization.config import resolve_quant_format
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import select_quant_linear

    return select_quant_linear(
        bits=qcfg.runtime_bits, group_size=qcfg.group_size, desc_act=qcfg.desc_act, sym=qcfg.sym, pack=True,
        dynamic=qcfg.dynamic, device=qcfg.device, pack_dtype=qcfg.pack_dtype, multi_select=False,
        backend=BACKEND.GPTQ_TORCH, format=resolve_quant_format(qcfg.format, qcfg.method),
        quant_method=qcfg.export_quant_method())


def pack(spool: Spool, full: str, q, scales, zeros, g_idx, bias, *, qcfg, kernel) -> None:
    """Pack one solved linear as GPTQModel's processor does (``create_quant_module`` + ``pack_module``), and spool it."""
    import torch
    from gptqmodel.quantization.config import resolve_quant_format
    from gptqmodel.utils.model import create_quant_module, pack_module

    shell = torch.nn.Linear(q.shape[1], q.shape[0], bias=bias is not None, device="meta", dtype=q.dtype)
    shell.weight = torch.nn.Parameter(q, requires_grad=False)
    if bias is not None:
        shell.bias = torch.nn.Parameter(bias, requires_grad=False)
    holder = torch.nn.Module()
    holder.add_module("linear", shell)
    qc = qcfg
    create_quant_module(name="linear", linear_cls=kernel, bits=qc.runtime_bits, desc_act=qc.desc_act,
                        dynamic=qc.dynamic, group_size=qc.group_size, module=holder, submodule=shell, sym=qc.sym,
                        device=qc.device, lm_head_name="lm_head", pack_dtype=qc.pack_dtype,
                        format=resolve_quant_format(qc.format, qc.method), register_buffers=False)
    packed = holder.linear
    pack_module(name="linear", qModules={"linear": packed}, q_scales=scales, q_zeros=zeros, q_g_idx=g_idx,
                layers={"linear": shell}, quant_linear_cls=kernel, lock=None, quantize_config=qc)
    spool.add(full, packed.state_dict())


def write_weights(out: Path, order: list[str], base: dict[str, Any], spool: Spool) -> None:
    """``model.safetensors`` from the unquantized ``base`` tensors and the spooled packed modules.

    ``order`` is the source state dict's tensor names; a quantized linear's tensors take the
    place of its ``weight`` (and ``bias``).
    """
    from gptqmodel.utils.model import streaming_state_dict_to_shards

    spool.close()
    state: dict[str, Any] = {}
    for name in order:
        module = name.rsplit(".", 1)[0]
        if module in spool.modules:
            state.update(spool.modules[module])
        elif name in base:
            state[name] = base[name]
    placed = {name.rsplit(".", 1)[0] for name in order}
    missing = sorted(set(spool.modules) - placed)
    if missing:
        raise RuntimeError(f"packed modules not in the model's state dict: {', '.join(missing[:5])}")
    files, weight_map, total = streaming_state_dict_to_shards(
        state, save_dir=str(out), model_base_name="model", single_file_name="model.safetensors",
        metadata={"format": "pt"}, max_shard_size=MAX_SHARD_BYTES)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    spool.path.unlink()


def write_model_files(out: Path, config, generation_config, tokenizer, source: Path) -> None:
    """``config.json``, ``generation_config.json`` and the tokenizer files, as GPTQModel's save writes them.

    The quantization config is put in afterwards (``gptq.write_gptq_configs``).
    """
    import copy

    from gptqmodel.utils.hf import sanitize_generation_config_file, sanitize_model_config
    from transformers import PreTrainedTokenizerFast

    config = copy.deepcopy(config)
    sanitize_model_config(config)
    config.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
        sanitize_generation_config_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(str(out))
    _source_tokenizer_class(out, source, fast=isinstance(getattr(tokenizer, "tokenizer", tokenizer), PreTrainedTokenizerFast))


def _source_tokenizer_class(out: Path, source: Path, fast: bool) -> None:
    """Name the tokenizer class as the source does, as GPTQModel's save does (transformers 5 writes a
    class older versions cannot load); ``Fast`` is appended when the saved tokenizer is the fast one."""
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    wanted = get_tokenizer_config(str(source)).get("tokenizer_class")
    saved = get_tokenizer_config(str(out))
    if not wanted:
        return
    if not wanted.endswith("Fast") and fast:
        wanted += "Fast"
    if saved.get("tokenizer_class") != wanted:
        saved["tokenizer_class"] = wanted
        (out / "tokenizer_config.json").write_text(json.dumps(saved, indent=2, ensure_ascii=False))
