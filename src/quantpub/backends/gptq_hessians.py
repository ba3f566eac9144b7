"""One decoder layer's calibration statistics for the shared GPTQ pass, and the GPTQ tasks that solve from them.

A forward over every sample with hooks on the layer's linears accumulates each distinct
input's Hessian once (q/k/v read one tensor, so do gate/up); the accumulators are GPTQModel
``GPTQ`` tasks set up as its processor sets them up, so the statistics are exactly those its
looper gathers. Each variant's task then adopts the Hessian, and variants with the same
column order and damp share one inverse factor.
"""

from __future__ import annotations

from typing import Any


class LayerHessians:
    """One layer's forward over all samples with hooks that accumulate each distinct input's Hessian.

    A module reading the very tensor an earlier module of the same call read (q/k/v) follows
    that module's accumulator; accumulators are GPTQModel ``GPTQ`` tasks, so the statistics
    are exactly those its looper gathers.
    """

    def __init__(self, modules: dict[str, Any], prefix: str, index: int, qcfg, total_tokens: int):
        self.modules, self.prefix, self.index, self.qcfg, self.total = modules, prefix, index, qcfg, total_tokens
        self.tasks: dict[str, Any] = {}
        self.leader_of: dict[str, str] = {}
        self.inverses: dict[tuple, tuple] = {}
        self._seen: list[tuple[Any, str]] = []

    def run(self, layer, hidden: list, calls: dict) -> list:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        outputs = []
        try:
            for x in hidden:
                args, kwargs = calls[x.shape[0]]
                self._seen.clear()
                out = layer(x, *args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            self._seen.clear()
            for h in handles:
                h.remove()
        return outputs

    def _hook(self, name: str):
        def hook(module, args, out):
            x = args[0]
            leader = next((n for seen, n in self._seen if seen is x), name)
            if self.leader_of.setdefault(name, leader) != leader:
                raise RuntimeError(f"{self.prefix}.{name} read another module's input in one sample and its own in "
                                   "another; the shared mode cannot share its Hessian (use gptq.mode: exact)")
            if leader != name:
                return
            self._seen.append((x, name))
            if name not in self.tasks:
                self.tasks[name] = gptq_task(self.modules[name], name, f"{self.prefix}.{name}", self.index, self.qcfg,
                                         self.total)
            self.tasks[name].add_batch(x, out)
        return hook

    def leader(self, name: str):
        """The task holding ``name``'s Hessian; None when no token reached it (an unrouted expert)."""
        return self.tasks.get(self.leader_of.get(name, name))

    def share_inverse(self, task, name: str) -> None:
        """Let ``task`` reuse the damped inverse factor an earlier variant computed from the same Hessian.

        The factor depends on the Hessian, the column order (act order permutes by the Hessian's
        diagonal, the same for every variant) and damp, not on bits or group size: four of the
        six TheBloke branches share one per linear. GPTQ's solve only reads it.
        """
        key = (self.leader_of.get(name, name), bool(task.qcfg.desc_act), float(task.qcfg.damp_percent),
               float(task.qcfg.damp_auto_increment or 0.0))
        if any(k[0] != key[0] for k in self.inverses):  # modules sharing a Hessian are solved one after another
            self.inverses.clear()
        compute = task.hessian_inverse

        def shared(h):
            if key not in self.inverses:
                factor, damp = compute(h)
                self.inverses[key] = (factor, damp, h.diagonal().clone())
            factor, damp, diagonal = self.inverses[key]
            h.diagonal().copy_(diagonal)  # the diagonal the factor was found for (a floor may have raised it)
            return factor, damp

        task.hessian_inverse = shared

    def free(self) -> None:
        for task in self.tasks.values():
            task.free()
        self.tasks.clear()
        self.inverses.clear()


def gptq_task(module, name: str, full: str, index: int, qcfg, total_tokens: int):
    """A GPTQ task set up as GPTQModel's processor sets it up (per-module config, fallback, per-channel)."""
    from gptqmodel.looper.gptq_processor import clone_gptq_config_for_module
    from gptqmodel.looper.named_module import NamedModule
    from gptqmodel.quantization.gptq import GPTQ

    config = clone_gptq_config_for_module(qcfg, full)
    task = GPTQ(NamedModule(module, name, full, index), qcfg=config)
    task.fallback = config.fallback
    task.expected_nsamples = total_tokens
    task.quantizer.configure(perchannel=True)
    return task


def adopted(task, name: str, hessians: LayerHessians):
    """``task`` with the Hessian (and the shared inverse factor) its module's input measured."""
    leader = hessians.leader(name)
    if leader is not None:
        task.adopt_hessian_from(leader)
        hessians.share_inverse(task, name)
    return task
