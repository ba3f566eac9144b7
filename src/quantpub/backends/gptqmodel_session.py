"""The source model through GPTQModel: one resident copy at a time, loaded fresh per use.

GPTQ and AWQ replace a model's linear layers in place, so a variant cannot reuse another's
model. Rather than keeping a pristine copy in memory and deep-copying it per variant (three
copies at the peak, plus a cast for AWQ), each use loads the checkpoint again: the page cache
makes the second read cheap, and host memory holds one copy of the weights at a time. The
shared GPTQ pass (``gptq_shared``) loads once for all its variants.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# transformers and GPTQModel patch module-level state while they build a model (init
# functions, default devices); loads run one at a time, even from helper threads.
LOAD_LOCK = threading.Lock()


def _import_gptqmodel():
    # GPTQModel sizes its CPU worker pools from this at import; its default fails on 2 cores.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    import gptqmodel

    return gptqmodel


class ModelSession:
    """Where the source model is, its tokenizer, and the device and dtype work runs in."""

    def __init__(self, model_dir: Path, device: str, dtype):
        self.model_dir, self.device, self.dtype = Path(model_dir), device, dtype

    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def quant_device(self):
        from gptqmodel.models._const import DEVICE

        return DEVICE.CUDA if self.device.startswith("cuda") else DEVICE.CPU

    def load(self, quantize_config, dtype=None):
        """A GPTQModel wrapper around a newly loaded copy of the source model, ready to quantize."""
        gptqmodel = _import_gptqmodel()
        dtype = dtype or self.dtype
        log.info("loading %s (%s)", self.model_dir, dtype)
        with LOAD_LOCK:
            loaded = gptqmodel.GPTQModel.load(str(self.model_dir), quantize_config, device="cpu", dtype=dtype)
        quantize_config.device = self.quant_device()
        # Re-wrapped with the session's tokenizer: the files saved beside the weights come from it.
        return type(loaded)(loaded.model, quantized=False, quantize_config=quantize_config, tokenizer=self.tokenizer,
                            model_local_path=str(self.model_dir))

    @staticmethod
    def release(wrapper) -> None:
        """Free a quantized model's tensors now, whoever still refers to the module.

        GPTQModel's looper objects outlive ``quantize`` (its worker threads keep their last task),
        and they hold the model: without this, each variant's copy stayed resident while the next
        variant loaded its own (measured: 1.0-1.9 GB more on a 363M model). Moving the modules to
        the meta device drops their storage at once (no garbage collection needed); the files
        are already saved.
        """
        wrapper.model.to("meta")

