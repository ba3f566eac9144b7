"""The bounded AWQ clipping search gives GPTQModel's own result bit for bit."""

import torch

from quantpub.backends import awq


def test_bounded_clip_search_is_the_original_bit_for_bit(monkeypatch):
    from gptqmodel.looper.awq_processor import AWQProcessor
    from gptqmodel.quantization.config import AWQConfig

    original = AWQProcessor._compute_best_clip
    original = getattr(original, "__wrapped__", original)  # an in-process AWQ run may have patched it already
    monkeypatch.setattr(AWQProcessor, "_compute_best_clip", original)  # restored after the test
    processor = AWQProcessor.__new__(AWQProcessor)
    processor.qcfg = AWQConfig(bits=4, group_size=128, sym=False)
    torch.manual_seed(0)
    w = torch.randn(512, 1024, dtype=torch.bfloat16)
    x = torch.randn(300, 1024, dtype=torch.bfloat16)
    expected = original(processor, w, x)
    awq.bound_clip_search(budget=64 * 300 * 1024 * 2)  # 64 rows at a time: 8 slices
    assert AWQProcessor._compute_best_clip is not original
    got = AWQProcessor._compute_best_clip(processor, w, x)
    assert got.shape == expected.shape and torch.equal(got, expected)
    awq.bound_clip_search()  # a second patch does not wrap the first
    assert AWQProcessor._compute_best_clip.quantpub_bounded
