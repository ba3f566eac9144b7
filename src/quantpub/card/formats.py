"""What the compressed-tensors and MLX cards render: their table rows, front matter and "Tested to load in".

Read from the variants' manifests only. A manifest of these formats carries (besides what every
manifest has: ``variant``, ``method``, ``branch``, ``repo``, ``size``, ``files``, ``tools``,
``calibration``, ``evaluation``):

* ``parameters``: the builder's ``manifest_parameters`` (compressed-tensors: ``scheme``,
  ``group_size``, ``act_order``, ``damp``; MLX: ``bits``, ``group_size``);
* ``build``: the builder's record (``route`` for compressed-tensors);
* ``validation``: the builder's ``validate`` record (``execution`` says how a CPU ran it);
* ``compat``: ``quantpub.compat.check_variant``'s record, optionally with a ``kld`` per runtime
  (``quantpub.runtime_quality.runtime_klds``).

Nothing is claimed for a runtime that has no record: it is listed as not tested.
"""

from __future__ import annotations

from typing import Any

from quantpub.backends import backend
from quantpub.card.quality import dataset_cell, measured
from quantpub.formatting import gb
from quantpub.manifest import Manifest

SCHEMES = {  # how RedHatAI's cards describe each scheme: weights, activations
    "W4A16": ("INT4, symmetric, one scale per group of {group} input columns", "16-bit (not quantized)"),
    "W8A8": ("INT8, symmetric, one scale per output channel", "INT8, symmetric, one scale per token, computed at run time"),
    "FP8_DYNAMIC": ("FP8 (E4M3), one scale per output channel", "FP8 (E4M3), one scale per token, computed at run time"),
}
SCHEME_TAGS = {"W4A16": ["w4a16", "int4"], "W8A8": ["w8a8", "int8"], "FP8_DYNAMIC": ["fp8"]}
UNTESTED = {
    "compressed_tensors": "vLLM and SGLang on GPUs, where these files run on the scheme's own kernels (no GPU "
                          "ran them here)",
    "mlx": "MLX on Apple silicon (Metal): these files were checked with MLX's CPU build on Linux, which "
           "computes them in float32 (a Mac computes in the file's 16-bit dtype)",
}


def tags(manifests: list[Manifest]) -> list[str]:
    """Front-matter tags: the format and ``quantized`` (GPTQ, GGUF)."""
    return [manifests[0].method, "quantized"]


def awq_tags(manifests: list[Manifest]) -> list[str]:
    return ["awq", "quantized", "4-bit"]


def ct_tags(manifests: list[Manifest]) -> list[str]:
    """compressed-tensors: the format, the scheme's own tags, and the runtime that serves it."""
    return ["compressed-tensors", "quantized", *SCHEME_TAGS[_params(manifests[0]).scheme], "vllm"]


def mlx_tags(manifests: list[Manifest]) -> list[str]:
    return ["mlx", "quantized", f"{_params(manifests[0]).bits}-bit"]


def _params(m: Manifest):
    return backend(m.method).read_parameters(m.parameters)


def ct_rows(manifests: list[Manifest], source, hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    """One row per variant: scheme, what weights and activations become, the GPTQ solve, size."""
    rows = []
    for m in manifests:
        p = _params(m)
        weights, activations = SCHEMES[p.scheme]
        gptq = "-" if p.damp is None else f"damp {p.damp}, act order {_act_order(p.act_order)}"
        rows.append({"branch": m.branch, "url": f"{hub}/{repo}/tree/{m.branch}", "scheme": p.scheme,
                     "weights": weights.format(group=p.group_size), "activations": activations,
                     "gptq": gptq, "dataset": _dataset(m.calibration),
                     "seq_len": m.calibration.seq_len if m.calibration else "-",
                     "size": gb(m.size), "route": (m.build.route if m.build else None) or "-", **measured(m, q)})
    return rows


def mlx_rows(manifests: list[Manifest], source, hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    return [{"branch": m.branch, "url": f"{hub}/{repo}/tree/{m.branch}", "bits": _params(m).bits,
             "gs": _params(m).group_size, "size": gb(m.size), **measured(m, q)} for m in manifests]


def _act_order(value) -> str:
    return {True: "yes", False: "no", "group_aware": "group-aware (static)"}.get(value, str(value))


def _dataset(calib) -> str:
    return dataset_cell(calib) if calib else "none (data-free)"


def tested_in(manifests: list[Manifest]) -> dict[str, Any]:
    """The "Tested to load in" section: per runtime record, what it did, from the manifests only."""
    rows, untested = [], []
    for m in manifests:
        execution = m.validation.execution
        for name, r in (m.compat.runtimes if m.compat else {}).items():
            label = r.label or name
            if r.status == "not tested":
                untested.append(f"{label} ({r.reason or 'not installed where the files were made'})")
                continue
            if r.status == "loads":
                detail = f"{len(r.generated_tokens or [])} tokens generated on {(r.device or 'cpu').upper()}"
                if r.kld is not None:
                    detail += f"; mean KLD {r.kld:.3g} from the unquantized model over the prompt"
                if name.startswith("transformers") and execution:
                    detail += f"; {execution}"
            else:
                detail = "`" + " ".join(str(r.error or "").split()).replace("|", "\\|").replace("`", "'")[:300] + "`"
            rows.append({"runtime": label, "result": "loads" if r.status == "loads" else "does not load",
                         "branch": m.branch or m.variant, "detail": detail})
    untested.append(UNTESTED[manifests[0].method])
    return {"rows": rows, "untested": "; ".join(dict.fromkeys(untested))}
