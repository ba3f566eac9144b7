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

from quantpub.plan import gb

LIBRARY = {"gguf": "gguf", "compressed_tensors": "vllm", "mlx": "mlx"}  # front matter library_name; else transformers
SCHEMES = {  # how RedHatAI's cards describe each scheme: weights, activations
    "W4A16": ("INT4, symmetric, one scale per group of {group} input columns", "16-bit (not quantized)"),
    "W8A8": ("INT8, symmetric, one scale per output channel", "INT8, symmetric, one scale per token, computed at run time"),
    "FP8_DYNAMIC": ("FP8 (E4M3), one scale per output channel", "FP8 (E4M3), one scale per token, computed at run time"),
}
SCHEME_TAGS = {"W4A16": ["w4a16", "int4"], "W8A8": ["w8a8", "int8"], "FP8_DYNAMIC": ["fp8"]}
UNTESTED = {
    "compressed_tensors": "vLLM and SGLang on GPUs, where these files run on the scheme's own kernels (no GPU "
                          "ran them here)",
    "mlx": "MLX on Apple silicon (Metal): these files were checked with MLX's CPU build on Linux, the same "
           "format and the same arithmetic on another device",
}


def tags(kind: str, manifests: list[dict]) -> list[str]:
    """Front-matter tags: the format, ``quantized``, and the scheme or width."""
    if kind == "compressed_tensors":
        scheme = manifests[0]["parameters"]["scheme"]
        return ["compressed-tensors", "quantized", *SCHEME_TAGS[scheme], "vllm"]
    if kind == "mlx":
        return ["mlx", "quantized", f"{manifests[0]['parameters']['bits']}-bit"]
    return [kind, "quantized", *(["4-bit"] if kind == "awq" else [])]


def ct_rows(manifests: list[dict], hub: str, repo: str, measured) -> list[dict[str, Any]]:
    """One row per variant: scheme, what weights and activations become, the GPTQ solve, size."""
    rows = []
    for m in manifests:
        p = m["parameters"]
        weights, activations = SCHEMES[p["scheme"]]
        calib = m.get("calibration")
        gptq = "-" if p.get("damp") is None else (
            f"damp {p['damp']}, act order {_act_order(p['act_order'])}")
        rows.append({"branch": m["branch"], "url": f"{hub}/{repo}/tree/{m['branch']}", "scheme": p["scheme"],
                     "weights": weights.format(group=p.get("group_size")), "activations": activations,
                     "gptq": gptq, "dataset": _dataset(calib), "seq_len": calib["seq_len"] if calib else "-",
                     "size": gb(m["size"]), "route": (m.get("build") or {}).get("route", "-"), **measured(m)})
    return rows


def mlx_rows(manifests: list[dict], hub: str, repo: str, measured) -> list[dict[str, Any]]:
    return [{"branch": m["branch"], "url": f"{hub}/{repo}/tree/{m['branch']}", "bits": m["parameters"]["bits"],
             "gs": m["parameters"]["group_size"], "size": gb(m["size"]), **measured(m)} for m in manifests]


def _act_order(value) -> str:
    return {True: "yes", False: "no", "group_aware": "group-aware (static)"}.get(value, str(value))


def _dataset(calib: dict[str, Any] | None) -> str:
    from quantpub.card.render import dataset_cell

    return dataset_cell(calib) if calib else "none (data-free)"


def tested_in(kind: str, manifests: list[dict]) -> dict[str, Any]:
    """The "Tested to load in" section: per runtime record, what it did, from the manifests only."""
    rows, untested = [], []
    for m in manifests:
        validation = m.get("validation") or {}
        for name, r in ((m.get("compat") or {}).get("runtimes") or {}).items():
            label = r.get("label") or name
            if r["status"] == "not tested":
                untested.append(f"{label} ({r.get('reason', 'not installed where the files were made')})")
                continue
            if r["status"] == "loads":
                detail = f"{len(r.get('generated_tokens') or [])} tokens generated on {r.get('device', 'cpu').upper()}"
                if r.get("kld") is not None:
                    detail += f"; mean KLD {r['kld']:.3g} from the unquantized model over the prompt"
                if name.startswith("transformers") and validation.get("execution"):
                    detail += f"; {validation['execution']}"
            else:
                detail = "`" + " ".join(str(r.get("error", "")).split()).replace("|", "\\|").replace("`", "'")[:300] + "`"
            rows.append({"runtime": label, "result": "loads" if r["status"] == "loads" else "does not load",
                         "branch": m.get("branch") or m["variant"], "detail": detail})
    untested.append(UNTESTED[kind])
    return {"rows": rows, "untested": "; ".join(dict.fromkeys(untested))}
