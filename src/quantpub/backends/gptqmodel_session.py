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
    """Where the source model is, its tokenizer, and the device and dtype work runs in.

    ``stream``: the model does not fit in host memory, so no load holds it whole. GPTQModel
    builds the model on the meta device, reads each decoder layer from the mmapped safetensors
    when its turn comes (its "lazy turtle") and writes each quantized layer to ``scratch``
    (``offload_to_disk``); the page cache is then the only full copy, and the kernel may evict it.
    """

    def __init__(self, model_dir: Path, device: str, dtype, *, stream: bool = False, scratch: Path | None = None):
        self.model_dir, self.device, self.dtype = Path(model_dir), device, dtype
        self.stream, self.scratch = stream, scratch

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
        if self.stream:
            quantize_config.offload_to_disk = True
            quantize_config.offload_to_disk_path = str(self.offload_dir())
        log.info("loading %s (%s%s)", self.model_dir, dtype, ", streamed layer by layer" if self.stream else "")
        with LOAD_LOCK:
            loaded = gptqmodel.GPTQModel.load(str(self.model_dir), quantize_config, device="cpu", dtype=dtype)
        quantize_config.device = self.quant_device()
        # Re-wrapped with the session's tokenizer: the files saved beside the weights come from it.
        return type(loaded)(loaded.model, quantized=False, quantize_config=quantize_config, tokenizer=self.tokenizer,
                            model_local_path=str(self.model_dir), turtle_model=loaded.turtle_model)

    def offload_dir(self) -> Path:
        """Where a streamed load writes its quantized layers: a fresh folder per load, inside ``scratch``."""
        import tempfile

        if self.scratch is None:
            raise ValueError("a streamed session needs a scratch directory for GPTQModel's offloaded layers")
        self.scratch.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".offload-", dir=self.scratch))

    def cleanup(self, wrapper) -> None:
        """Delete a streamed load's offloaded layers once its files are saved."""
        import shutil

        path = getattr(wrapper.quantize_config, "offload_to_disk_path", None) if self.stream else None
        if path and Path(path).parent == self.scratch:
            shutil.rmtree(path, ignore_errors=True)

    def release(self, wrapper) -> None:
        """Free a quantized model's tensors now, whoever still refers to the module.

        GPTQModel's looper objects outlive ``quantize`` (its worker threads keep their last task),
        and they hold the model: without this, each variant's copy stayed resident while the next
        variant loaded its own (measured: 1.0-1.9 GB more on a 363M model). Moving the modules to
        the meta device drops their storage at once (no garbage collection needed); the files
        are already saved.
        """
        wrapper.model.to("meta")
        self.cleanup(wrapper)

