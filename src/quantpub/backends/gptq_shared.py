"""GPTQ for every variant of a matrix from one calibration pass: measure once, build many.

Layer by layer, the calibration samples go through the *unquantized* layer once; forward
hooks accumulate each linear's Hessian (X^T X) once, and modules that read the same input
tensor (q/k/v, gate/up) share one. GPTQModel's own solver (``GPTQ.quantize``) then runs per
variant and linear on a private copy of that Hessian: bits, group size, act order, damp and
sym change only the solve. The layer's unquantized outputs are the next layer's inputs (the
*shared* mode). GPTQModel's looper instead feeds each variant's quantized outputs forward and
so pays the calibration per variant (the *exact* mode, ``gptq.mode: exact``, ``gptq.quantize``).

On CPU the work runs side by side, one thread each: layer i's solves (the act-order variants
and the others as two stacked groups) beside layer i+1's forward, which needs only layer i's
unquantized outputs. Packing (GPTQModel's ``pack_module``, the AutoGPTQ v1 layout) and
writing run on a helper thread while the next layer computes; each variant's packed tensors
go to its spool file at once, so the pass holds one copy of the model plus one or two layers
of results.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantpub import progress
from quantpub.backends import gptq
from quantpub.backends.gptq_hessians import LayerHessians, adopted, gptq_task
from quantpub.backends.gptq_solve import Unstackable, solve_stacked, stackable
from quantpub.backends.gptq_writer import SPOOL, Spool, pack, pack_kernel, write_model_files, write_weights
from quantpub.backends.gptqmodel_session import ModelSession
from quantpub.calibration import CalibrationSet
from quantpub.matrix import GptqVariant

log = logging.getLogger(__name__)


@dataclass
class Target:
    """One variant of the pass: its parameters, its output directory, and how it went."""

    id: str
    params: GptqVariant
    out: Path
    quant_log: list[dict[str, Any]] = field(default_factory=list)  # rows as GPTQModel logs them
    error: str | None = None
    spool: Spool | None = None
    qcfg: Any = None
    kernel: Any = None
    pending: list[tuple[int, Future]] = field(default_factory=list)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("%s: failed: %s", self.id, self.error)


class _Captured(Exception):
    """Raised by the first layer's pre-hook once it has its inputs."""


def quantize_shared(session: ModelSession, targets: list[Target], calibration: CalibrationSet, executor: Executor,
                    finish: Callable[[Target], Any]) -> dict[str, Future]:
    """Quantize every target in one pass; per target, a future of ``finish(target)`` once its files are written.

    A target whose solve or packing fails has its ``error`` set and its future raises; the
    others go on. An error of the pass itself (loading, a forward) propagates.
    """
    import gc

    import torch

    wrapper = session.load(gptq.quantize_config(targets[0].params))
    for t in targets:
        t.qcfg = gptq.quantize_config(t.params)
        t.qcfg.device = session.quant_device()
        t.kernel = pack_kernel(t.qcfg)
        t.out.mkdir(parents=True, exist_ok=True)
        t.spool = Spool(t.out / SPOOL)
    model = wrapper.model.eval()
    device = torch.device(session.device)
    layers_node = wrapper.extract_layers_node()[0]
    layers = model.get_submodule(layers_node)
    names = [n for group in wrapper.simple_layer_modules(model.config, wrapper.quantize_config) for n in group]
    total_tokens = calibration.n_samples * calibration.seq_len
    started = time.monotonic()
    ahead = device.type == "cpu"  # solve layer i while layer i+1's forward runs (CPU: the cores are the budget)
    solving: tuple[int, Future] | None = None
    steps = len(layers)

    def solved(index: int, future: Future) -> None:
        future.result()
        waiting = time.monotonic()
        _settle(targets, before=index)  # at most two layers of packed results in flight
        for t in targets:
            if t.error is None:
                progress.report(t.id, "quantizing", step=index + 1, steps=steps)
        log.info("layer %d/%d done; %.2fs waiting for the previous layer's packing (%.1fs in all)", index + 1,
                 steps, time.monotonic() - waiting, time.monotonic() - started)

    with torch.no_grad(), _solve_threads(device), ThreadPoolExecutor(1, thread_name_prefix="quantpub-solve") as solver:
        hidden, calls = _capture(model, layers_node, calibration, device)
        for index, layer in enumerate(layers):
            live = [t for t in targets if t.error is None]
            if not live:
                break
            hessians, outputs = _measure(layer, f"{layers_node}.{index}", index, names, hidden, calls,
                                         wrapper.quantize_config, total_tokens, device)
            if solving is not None:
                solved(*solving)
            solving = (index, solver.submit(_solve_layer, layer, hessians, live, total_tokens, device, executor))
            if not ahead:
                solved(*solving)
                solving = None
            hidden = outputs
        if solving is not None:
            solved(*solving)
    _settle(targets, before=len(layers))
    files = _ModelFiles(wrapper, names_in_layers={f"{layers_node}.{i}.{n}" for i in range(len(layers)) for n in names})
    del wrapper, model, layers, hidden, calls
    gc.collect()
    # What is left is long-lived (modules, the session). Loading a GPTQ checkpoint makes GPTQModel
    # collect garbage (twice per variant to validate it): 0.3 s each over these objects, 0.02 s frozen.
    gc.freeze()
    futures = {}
    for t in targets:
        if t.error is None:
            futures[t.id] = executor.submit(_write_and_finish, t, files, finish)
        else:
            futures[t.id] = _failed(t)
    return futures


def _measure(layer, prefix: str, index: int, names: list[str], hidden: list, calls: dict, qcfg, total_tokens: int,
             device) -> tuple[LayerHessians, list]:
    """One layer's forward over every sample: its linears' Hessians, and its outputs (the next layer's inputs)."""
    begin = time.monotonic()
    layer.to(device)
    modules = {n: layer.get_submodule(n) for n in names if _has_submodule(layer, n)}
    hessians = LayerHessians(modules, prefix, index, qcfg, total_tokens)
    outputs = hessians.run(layer, hidden, calls)
    log.info("%s: forward + Hessians %.2fs", prefix, time.monotonic() - begin)
    return hessians, outputs


def _solve_layer(layer, hessians: LayerHessians, live: list[Target], total_tokens: int, device, executor: Executor) -> None:
    """Every variant's solves for one measured layer, module after module, handed to packing as they finish."""
    import torch

    begin = time.monotonic()
    with torch.no_grad():  # grad mode is per thread
        for name, module in hessians.modules.items():
            _solve(module, name, f"{hessians.prefix}.{name}", hessians.index, hessians,
                   [t for t in live if t.error is None], total_tokens, executor, stack=device.type == "cpu")
    hessians.free()
    layer.to("cpu")
    log.info("%s: %d variants solved in %.2fs", hessians.prefix, len(live), time.monotonic() - begin)


def _capture(model, layers_node: str, calibration: CalibrationSet, device):
    """The first layer's inputs for every sample, and the other arguments it is called with per batch size."""
    import torch

    hidden, calls = [], {}
    layers = model.get_submodule(layers_node)

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        if kwargs.get("past_key_values") is not None:  # replayed calls must not grow a cache
            kwargs["past_key_values"] = None
        hidden.append(x)
        calls.setdefault(x.shape[0], (args[1:], kwargs))
        raise _Captured

    parent = model.get_submodule(layers_node.rpartition(".")[0])  # embeddings, rotary, norm: to the device
    outside = [m for m in parent.children() if m is not layers]
    for m in outside:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for sample in calibration.samples:
            ids = torch.tensor([sample], device=device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        for m in outside:
            m.to("cpu")
    if len(hidden) != calibration.n_samples:
        raise RuntimeError(f"captured {len(hidden)} of {calibration.n_samples} first-layer inputs")
    return hidden, calls


@contextmanager
def _solve_threads(device):
    """One intra-op thread per task for the pass on CPU: the parallelism is between tasks.

    A GPTQ solve is thousands of small column operations: parallel regions cost more than they
    save, and on a busy machine their spinning threads made a solve 10-20x slower (measured on
    2 shared cores: 6 variants of a tiny llama solved in 4-7 s with one thread, 40-100 s with two).
    The pass instead runs the next layer's forward beside this layer's solves, and the solve
    groups (act order or not) beside each other.
    """
    import torch

    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _solve(module, name: str, full: str, index: int, hessians: LayerHessians, targets: list[Target], total_tokens: int,
           executor: Executor, *, stack: bool) -> None:
    """Solve one linear for every target and hand the results to packing.

    On CPU the targets sharing an inverse factor are solved as one stacked matrix
    (``gptq_solve``); otherwise, or when stacking does not apply, GPTQModel solves each.
    """
    tasks = {}
    for t in targets:
        try:
            tasks[t.id] = adopted(gptq_task(module, name, full, index, t.qcfg, total_tokens), name, hessians)
        except Exception as exc:  # noqa: BLE001 - this variant fails, the others go on
            t.fail(exc)
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        if t.id in tasks:
            key = (t.qcfg.desc_act, t.qcfg.damp_percent) if stack and stackable(tasks[t.id]) else (t.id,)
            groups.setdefault(key, []).append(t)

    def solve_group(group: list[Target]) -> None:
        results = None
        if len(group) > 1:
            try:
                results = solve_stacked([tasks[t.id] for t in group])
            except Unstackable as exc:
                log.info("%s: solving %d variants one by one (%s)", full, len(group), exc)
                tasks.update({t.id: adopted(gptq_task(module, name, full, index, t.qcfg, total_tokens), name, hessians)
                              for t in group})
        for i, t in enumerate(group):
            try:
                result = results[i] if results else tasks[t.id].quantize()
            except Exception as exc:  # noqa: BLE001 - this variant fails, the others go on
                t.fail(exc)
                continue
            finally:
                tasks[t.id].free()
            _submit(t, module, full, index, name, result, executor)

    if stack and len(groups) > 1:
        with ThreadPoolExecutor(max_workers=min(len(groups), os.cpu_count() or 1)) as pool:
            for future in [pool.submit(solve_group, group) for group in groups.values()]:
                future.result()
    else:
        for group in groups.values():
            solve_group(group)


def _submit(t: Target, module, full: str, index: int, name: str, result: tuple, executor: Executor) -> None:
    q, scales, zeros, g_idx, seconds, loss, damp, samples = result
    bias = module.bias.detach().cpu() if getattr(module, "bias", None) is not None else None
    t.quant_log.append({"layer": index, "module": name, "loss": loss if isinstance(loss, str) else f"{loss:.10f}",
                        "samples": f"{samples}", "damp": f"{damp:.5f}", "time": f"{seconds:.3f}"})
    t.pending.append((index, executor.submit(pack, t.spool, full, q.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu(),
                                             bias, qcfg=t.qcfg, kernel=t.kernel)))


def _settle(targets: list[Target], before: int) -> None:
    """Wait for the packing of layers before ``before``; a failure fails its variant."""
    for t in targets:
        keep = []
        for index, future in t.pending:
            if index >= before:
                keep.append((index, future))
                continue
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - packing failed for this variant only
                t.fail(exc)
        t.pending = keep


class _ModelFiles:
    """What the writer needs from the model once the pass is over: its unquantized tensors, configs, tokenizer."""

    def __init__(self, wrapper, names_in_layers: set[str]):
        from gptqmodel.utils.model import get_state_dict_for_save

        state = get_state_dict_for_save(wrapper.model)
        self.order = list(state)
        self.base = {n: e for n, e in state.items() if n.rsplit(".", 1)[0] not in names_in_layers}
        self.config = wrapper.model.config
        self.generation_config = getattr(wrapper.model, "generation_config", None)
        self.tokenizer = wrapper.tokenizer
        self.source = Path(wrapper.model_local_path)


def _write_and_finish(t: Target, files: _ModelFiles, finish: Callable[[Target], Any]):
    write_weights(t.out, files.order, files.base, t.spool)
    write_model_files(t.out, files.config, files.generation_config, files.tokenizer, files.source)
    gptq.write_gptq_configs(t.out, t.params)
    return finish(t)


def _failed(t: Target) -> Future:
    if t.spool is not None:
        t.spool.close()
    future: Future = Future()
    future.set_exception(RuntimeError(t.error))
    return future


def _has_submodule(layer, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


__all__ = ["SPOOL", "Target", "quantize_shared"]
