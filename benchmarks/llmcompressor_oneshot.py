"""llm-compressor's own route, for comparison: ``oneshot`` with the recipe its examples give per scheme.

Run by the interpreter of the ``llmcompressor`` venv (``quantpub compat venvs llmcompressor``), not by
quantpub's: llm-compressor 0.14 pins transformers<=5.17 and compressed-tensors 0.19. Imports only
what that venv has. Usage: ``python llmcompressor_oneshot.py SOURCE OUT SCHEME SAMPLES.json``
(SAMPLES: a JSON list of token-id lists, quantpub's calibration samples). Prints ``RESULT {json}``.
"""

import json
import sys
import time
from importlib import metadata


def recipe(scheme: str):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    if scheme == "FP8_DYNAMIC":  # examples/quantization_w8a8_fp8
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    if scheme == "W8A8":  # examples/quantization_w8a8_int8
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])  # examples/quantization_w4a16


def main(source: str, out: str, scheme: str, samples_file: str) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs = {}
    if scheme != "FP8_DYNAMIC":
        samples = json.load(open(samples_file))
        kwargs = {"dataset": Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]}),
                  "max_seq_length": len(samples[0]), "num_calibration_samples": len(samples)}
    oneshot(model=model, recipe=recipe(scheme), **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {"scheme": scheme, "seconds": round(time.monotonic() - started, 2),
            "versions": {p: metadata.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:5])), flush=True)
