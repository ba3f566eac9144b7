"""Checkpoint converters into compressed-tensors, run by the library's own ``convert_checkpoint``.

Both implement compressed-tensors' ``Converter`` protocol (``process``, ``validate``,
``update_config``, ``update_model_config``, ``get_dependencies``), so the library does the file
work (shards, index, ``config.json``'s ``quantization_config``) and its compressors and helpers
do the number formats:

* :class:`GptqToCompressed` rewrites a symmetric AutoGPTQ-layout checkpoint (what quantpub's
  GPTQ builds ship: qweight / qzeros / scales / g_idx, zero ``.bias``) as compressed-tensors
  ``pack-quantized`` W4A16 or ``int-quantized`` W8A8. GPTQ's symmetric grid is
  ``scale * (q - 2^(bits-1))``, compressed-tensors' is ``scale * i`` with ``i`` signed: the
  integers move over unchanged (``i = q - 2^(bits-1)``), the scales are the same numbers; no
  value is recomputed, so the result is the GPTQ solve bit for bit.
* :class:`DenseToFp8` quantizes a 16/32-bit checkpoint's linear weights to FP8-dynamic
  (E4M3, one scale per output channel from the channel's absolute maximum: llm-compressor's
  ``FP8_DYNAMIC`` preset with its default min-max observer), through the library's
  ``calculate_qparams`` and its naive compressor. Data-free.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
SCHEME_FORMAT = {"W4A16": "pack-quantized", "W8A8": "int-quantized", "FP8_DYNAMIC": "float-quantized"}


def ct_config(scheme: str, group_size: int | None, act_order: bool | str, ignore: Iterable[str]):
    """The ``QuantizationConfig`` of a scheme: llm-compressor's preset, as its ``oneshot`` would record it.

    ``act_order`` is recorded as ``static`` when the columns were solved in activation order
    with contiguous groups (the layout without ``g_idx`` that llm-compressor's default writes).
    """
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    q_scheme = preset_name_to_scheme(scheme, ["Linear"])
    if scheme == "W4A16":
        q_scheme.weights.group_size = group_size
    if scheme in ("W4A16", "W8A8"):
        q_scheme.weights.actorder = "static" if act_order else None
    q_scheme.format = SCHEME_FORMAT[scheme]
    return QuantizationConfig(config_groups={"group_0": q_scheme}, ignore=sorted(ignore),
                              format=SCHEME_FORMAT[scheme], quantization_status=QuantizationStatus.COMPRESSED)


class _Converter:
    """What both converters share: the config they write, no dependencies between shards."""

    scheme: str
    group_size: int | None = None
    act_order: bool | str = False
    ignore: tuple[str, ...] = ("lm_head",)

    def update_config(self, config):
        return ct_config(self.scheme, self.group_size, self.act_order, self.ignore)

    def update_model_config(self, model_config: dict) -> dict:
        return model_config

    def validate(self, tensors: dict) -> dict:
        return {name: t for name, t in tensors.items()}  # shapes are checked in process, on real tensors


class GptqToCompressed(_Converter):
    """AutoGPTQ v1 symmetric tensors -> compressed-tensors W4A16 (``pack-quantized``) or W8A8 (``int-quantized``).

    ``drop``: tensor names to leave out (the zero ``.bias`` AutoGPTQ writes for linears that have
    none in the source model). Raises ``ValueError`` naming the tensor for what the target format
    cannot hold: asymmetric zero points, or a ``g_idx`` that is not contiguous groups (act order).
    """

    def __init__(self, scheme: str, bits: int, group_size: int | None, act_order: bool | str, *,
                 ignore: Iterable[str] = ("lm_head",), drop: Iterable[str] = ()):
        if (scheme, bits) not in (("W4A16", 4), ("W8A8", 8)):
            raise ValueError(f"{scheme} takes {4 if scheme == 'W4A16' else 8}-bit GPTQ weights, not {bits}-bit")
        self.scheme, self.bits, self.group_size, self.act_order = scheme, bits, group_size, act_order
        self.ignore, self.drop = tuple(ignore), frozenset(drop)

    def get_dependencies(self, weight_name: str) -> set[str]:
        module, _, part = weight_name.rpartition(".")
        return {f"{module}.{p}" for p in GPTQ_PARTS[1:]} if part == "qweight" else set()

    def process(self, tensors: dict) -> dict:
        import torch
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        out = {}
        for name in [n for n in tensors if n.endswith(".qweight")]:
            module = name.removesuffix(".qweight")
            ints, scales = self._signed_weights(module, *(tensors[f"{module}.{p}"] for p in GPTQ_PARTS))
            if self.scheme == "W4A16":
                out[f"{module}.weight_packed"] = pack_to_int32(ints, 4)
                out[f"{module}.weight_shape"] = torch.tensor(ints.shape, dtype=torch.int64)
            else:
                out[f"{module}.weight"] = ints.to(torch.int8)
            out[f"{module}.weight_scale"] = scales.t().contiguous()
        done = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".qweight")}
        for name, tensor in tensors.items():
            module, _, part = name.rpartition(".")
            if name in self.drop or (module in done and part in GPTQ_PARTS):
                continue
            out[name] = tensor
        return out

    def _signed_weights(self, module: str, qweight, qzeros, scales, g_idx):
        """(signed integers [out, in], scales [groups, out]) of one module, checked against the target format."""
        import torch

        from quantpub.dequant import unpack

        q = torch.from_numpy(unpack(qweight.numpy(), self.bits, len(g_idx)))  # [in, out]
        zeros = torch.from_numpy(unpack(qzeros.numpy().T, self.bits, scales.shape[1]).T)  # [groups, out]
        half = 1 << (self.bits - 1)
        if not bool((zeros + 1 == half).all()):  # AutoGPTQ v1 stores zero - 1
            raise ValueError(f"{module}.qzeros: asymmetric GPTQ weights (zero points other than {half}); "
                             f"{self.scheme} holds symmetric weights only: quantize with sym: true")
        columns = q.shape[0]
        group = self.group_size or columns
        if not torch.equal(g_idx.to(torch.int64), torch.arange(columns) // group):
            raise ValueError(f"{module}.g_idx: columns are not in contiguous groups of {group} (desc_act act "
                             "order); compressed-tensors keeps no g_idx here: use act_order group_aware or false")
        if scales.shape[0] != -(-columns // group):
            raise ValueError(f"{module}.scales: {scales.shape[0]} groups, expected {-(-columns // group)} for group "
                             f"size {group}")
        return (q.to(torch.int32) - half).t().contiguous().to(torch.int8), scales


class DenseToFp8(_Converter):
    """Linear weights -> FP8 E4M3 with one scale per output channel; other floats to ``dtype``.

    ``linears``: the names of the modules to quantize (the decoder blocks' ``nn.Linear`` layers;
    ``ignore`` names the other linear layers, as the config must); the scales are stored in
    ``dtype``, as llm-compressor stores them in the model's dtype.
    """

    scheme = "FP8_DYNAMIC"

    def __init__(self, linears: Iterable[str], dtype, *, ignore: Iterable[str] = ("lm_head",)):
        self.linears = frozenset(linears)
        self.dtype, self.ignore = dtype, tuple(ignore)

    def get_dependencies(self, weight_name: str) -> set[str]:
        return set()

    def process(self, tensors: dict) -> dict:
        from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
        from compressed_tensors.quantization import preset_name_to_scheme
        from compressed_tensors.quantization.utils.helpers import calculate_qparams

        scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
        out = {}
        for name, tensor in tensors.items():
            module, _, part = name.rpartition(".")
            if module in self.linears and part == "weight":
                weight = tensor.float()
                scale, _ = calculate_qparams(weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True),
                                             scheme.weights)
                scale = scale.to(self.dtype)
                packed = NaiveQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
                out[name], out[f"{module}.weight_scale"] = packed["weight"], packed["weight_scale"]
            elif tensor.is_floating_point():
                out[name] = tensor.to(self.dtype)
            else:
                out[name] = tensor
        return out
