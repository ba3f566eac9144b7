"""Progress events from inside a stage, for the driver's live view and its ledger.

Stage code calls ``report(variant, phase, ...)``; in a worker process the executor installs a
sink that carries each event to the driver (a multiprocessing queue, or a Ray queue). Without
a sink (a plain ``quantpub quantize``), events only go to the log at debug level.

Phases a variant goes through: queued, calibrating, quantizing (``step``/``steps`` = layer),
validating, converting, evaluating, uploading (``step``/``steps`` = bytes), then done or failed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)
_sink: Callable[[dict[str, Any]], None] | None = None
_context: dict[str, Any] = {}
_last: dict[tuple, float] = {}
THROTTLE = 0.25  # seconds between two step events of one variant and phase


def install(sink: Callable[[dict[str, Any]], None] | None, **context: Any) -> None:
    """Send every event to ``sink`` with ``context`` (model, stage) added; ``None`` removes it."""
    global _sink, _context
    _sink, _context = sink, dict(context)
    _last.clear()


def report(variant: str | None, phase: str, *, step: int | None = None, steps: int | None = None,
           **fields: Any) -> None:
    """One event: ``variant`` entered ``phase`` (or advanced to ``step`` of ``steps`` in it)."""
    now = time.time()
    if step is not None and steps is not None and 0 < step < steps:
        key = (variant, phase)
        if now - _last.get(key, 0.0) < THROTTLE:
            return
        _last[key] = now
    event = {**_context, "variant": variant, "phase": phase, "step": step, "steps": steps, "time": now, **fields}
    if _sink is None:
        log.debug("progress: %s", event)
        return
    try:
        _sink(event)
    except Exception:  # noqa: BLE001 - progress must never fail the work it describes
        log.debug("progress event lost", exc_info=True)


def watch_decoder_layers(variant: str, phase: str = "quantizing"):
    """Report ``phase`` layer i/n whenever a decoder layer runs a forward; returns the hook handle to remove.

    A global forward pre-hook, so it follows the layers whatever library drives them: it
    recognises a decoder layer by its attention module's ``layer_idx`` and ``config``.
    """
    import torch

    def hook(module, _args):
        if type(module).__name__.endswith("DecoderLayer"):
            attn = getattr(module, "self_attn", None)
            index, config = getattr(attn, "layer_idx", None), getattr(attn, "config", None)
            if index is not None and config is not None:
                report(variant, phase, step=index + 1, steps=config.num_hidden_layers)

    return torch.nn.modules.module.register_module_forward_pre_hook(hook)
