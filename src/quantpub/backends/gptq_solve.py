"""GPTQ's column solve for several variants at once on CPU, row for row GPTQModel's arithmetic.

GPTQ treats the rows of a weight independently: each row is quantized column by column and
its error spread over the remaining columns through the inverse Hessian factor. Variants that
share that factor (same Hessian, same column order, same damp: q/k/v of one layer, or four of
TheBloke's six branches) can run as one matrix of stacked rows, each row on its own variant's
grid (bits, group size, sym). On a CPU a solve is thousands of tiny tensor operations whose
cost is per operation, so k stacked variants cost about one solve instead of k.

The arithmetic is GPTQModel's ``GPTQ.quantize`` (its quantizer's parameters, its inverse
factor, the same per-column operations, block updates per variant); a test checks that every
variant comes out byte-identical to GPTQModel's own solve. Cases it does not cover (the
low-sample fallback, static groups, group-aware reordering, no inverse, NaN loss) raise
``Unstackable`` and are solved by GPTQModel one variant at a time. On a GPU GPTQModel's fused
block kernel is faster than any per-column loop, so the shared pass does not stack there.
"""

from __future__ import annotations

import math
import time

BLOCK = 128  # GPTQModel's default block size


class Unstackable(Exception):
    """This group of solves needs GPTQModel's per-variant path."""


def stackable(task) -> bool:
    """Whether ``solve_stacked`` computes exactly what ``task.quantize()`` would."""
    import torch
    from gptqmodel.quantization.quantizer import Quantizer
    from gptqmodel.utils.fallback import should_use_fallback

    q = task.qcfg
    return (type(task.quantizer) is Quantizer and isinstance(task.module, torch.nn.Linear)
            and not (q.static_groups or q.act_group_aware or q.mock_quantization or task._tp_pad_cols)
            and task.nsamples > 0 and not should_use_fallback(task.fallback, float(task.nsamples),
                                                              task.expected_nsamples))


def solve_stacked(tasks: list) -> list[tuple]:
    """``task.quantize()``'s result for every task, from one stacked solve.

    All tasks hold the same Hessian (adopted from one leader), the same act order and damp.

    Raises:
        Unstackable: no inverse factor, or a NaN loss; the tasks' Hessians are consumed.
    """
    import torch

    started = time.time()
    lead = tasks[0]
    h = lead.finalize_hessian()
    for t in tasks[1:]:
        t.H = None  # each adopted its own copy; the lead's is the one used
    w = lead.clone_module(device=h.device)
    whole = []  # per-channel parameters over the whole row: what a variant without groups uses
    for t in tasks:
        t.quantizer.find_params(w, weight=True)
        whole.append((t.quantizer.scale, t.quantizer.zero))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if lead.qcfg.desc_act:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    hinv, damp = lead.hessian_inverse(h)
    if hinv is None:
        raise Unstackable("the Hessian has no inverse factor")
    rows, cols = w.shape
    spans = [slice(j * rows, (j + 1) * rows) for j in range(len(tasks))]
    stacked = w.repeat(len(tasks), 1)
    scale = torch.cat([s for s, _ in whole]).flatten()
    zero = torch.cat([z for _, z in whole]).flatten()
    maxq = torch.cat([t.quantizer.maxq.to(w.dtype).expand(rows) for t in tasks])
    groups = [t.qcfg.group_size for t in tasks]
    scales: list[list] = [[] for _ in tasks]
    zeros: list[list] = [[] for _ in tasks]
    q_all = torch.zeros_like(stacked)
    losses = torch.zeros_like(stacked)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        for j, (t, group) in enumerate(zip(tasks, groups)):
            # GPTQ takes a group's parameters from the weights as they stood at the block's start
            for column in range(i1 + (-i1) % group if group != -1 else cols, i2, group if group != -1 else 1):
                t.quantizer.find_params(stacked[spans[j], column:column + group], weight=True)
                scales[j].append((column, t.quantizer.scale))
                zeros[j].append(t.quantizer.zero)
        # The block column-major: each column's rows are contiguous. Every operation is GPTQModel's,
        # element for element, so the results are bit for bit the same.
        w1 = stacked[:, i1:i2].t().contiguous()
        q1, err1, losses1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        update = torch.empty_like(w1)  # reused per column: a fresh block of this size is an mmap, page faults and all
        for i in range(i2 - i1):
            column = i1 + i
            for j, group in enumerate(groups):
                if group != -1 and column % group == 0:
                    scale[spans[j]] = scales[j][column // group][1].flatten()
                    zero[spans[j]] = zeros[j][column // group].flatten()
            x = w1[i]
            d = hinv1[i, i]
            # GPTQModel's quantize(): clamp(round(x / scale) + zero, 0, maxq), with one maxq per row
            q = scale * (torch.minimum(torch.clamp(torch.round(x / scale) + zero, min=0), maxq) - zero)
            q1[i] = q
            delta = err1[i]
            torch.sub(x, q, out=delta)
            losses1[i] = delta.square() / d.square()
            delta.div_(d)
            rest = update[:i2 - i1 - i]
            torch.mul(hinv1[i, i:].unsqueeze(1), delta, out=rest)
            w1[i:] -= rest
        q_all[:, i1:i2] = q1.t()
        losses[:, i1:i2] = losses1.t().div_(2)
        for span in spans:  # one product per variant, in its own solve's layout: the same sums
            stacked[span, i2:] -= err1[:, span].t().contiguous().matmul(hinv[i1:i2, i2:])
    seconds = time.time() - started
    results = []
    for j, t in enumerate(tasks):
        loss = torch.sum(losses[spans[j]]).item() / t.nsamples
        if math.isnan(loss):
            raise Unstackable(f"NaN loss for {t.name}")
        group = groups[j] if groups[j] != -1 else cols
        g_idx = torch.tensor([i // group for i in range(cols)], dtype=torch.int32, device=q_all.device)
        q = q_all[spans[j]]
        if perm is not None:
            inverse = torch.argsort(perm).to(device=q.device)
            q, g_idx = q[:, inverse], g_idx[inverse]
        q = q.reshape(t.module.weight.shape).to(t.module.weight.dtype)
        if not scales[j]:
            scales[j].append((0, whole[j][0]))
            zeros[j].append(whole[j][1])
        results.append((q.to(t.module.weight.device), torch.cat([s for _, s in scales[j]], dim=1),
                        torch.cat(zeros[j], dim=1), g_idx,
                        seconds, loss, damp, t.nsamples))
    return results
