"""One source model loaded once through GPTQModel, handed out as fresh copies per variant.

GPTQ and AWQ quantization replace a model's linear layers in place, so each variant gets a
deep copy of the pristine model held here: the checkpoint is read from disk once, whatever
the number of variants (and cast once per dtype: GPTQ on CPU wants fp32, AWQ fp16).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _import_gptqmodel():
    # GPTQModel sizes its CPU worker pools from this at import; its default fails on 2 cores.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    import gptqmodel

    return gptqmodel


class ModelSession:
    """The pristine source model, its tokenizer, and the device work runs on."""

    def __init__(self, model_dir: Path, device: str, dtype):
        self.model_dir, self.device, self.dtype = Path(model_dir), device, dtype
        self._base = None
        self._casts: dict = {}

    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def quant_device(self):
        from gptqmodel.models._const import DEVICE

        return DEVICE.CUDA if self.device.startswith("cuda") else DEVICE.CPU

    def fresh(self, quantize_config, dtype=None):
        """A GPTQModel wrapper around a new copy of the source model, ready to quantize."""
        gptqmodel = _import_gptqmodel()
        if self._base is None:
            log.info("loading %s once for all variants (%s)", self.model_dir, self.dtype)
            self._base = gptqmodel.GPTQModel.load(str(self.model_dir), quantize_config, device="cpu",
                                                  dtype=self.dtype)
        dtype = dtype or self.dtype
        if dtype not in self._casts:
            inner = self._base.model if dtype == self.dtype else copy.deepcopy(self._base.model).to(dtype)
            self._casts[dtype] = inner
        quantize_config.device = self.quant_device()
        return type(self._base)(copy.deepcopy(self._casts[dtype]), quantized=False,
                                quantize_config=quantize_config, tokenizer=self.tokenizer,
                                model_local_path=str(self.model_dir))
