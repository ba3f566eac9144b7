"""What made a repo's files, from its manifests: tool versions, calibration data, importance matrix."""

from __future__ import annotations

from typing import Any

from quantpub.backends import backend
from quantpub.manifest import Manifest


TOOL_NAMES = {  # manifest key -> how the card names it, in the order it lists them
    "quantpub": "quantpub", "gptqmodel": "GPTQModel", "optimum": "Optimum", "transformers": "Transformers",
    "torch": "PyTorch", "llama.cpp": "llama.cpp", "llama-cpp-python": "llama-cpp-python",
}
LLAMA_CPP_COMMIT = "https://github.com/ggml-org/llama.cpp/commit/"


def tools(manifests: list[Manifest]) -> list[dict[str, str]]:
    """Each tool with every version the repo's variants record (one, unless variants were built apart)."""
    seen: dict[str, list[str]] = {}
    for m in manifests:
        for key, version in m.tools.items():
            versions = seen.setdefault(key, [])
            if version and str(version) not in versions:
                versions.append(str(version))
    out = []
    for key in sorted(seen, key=lambda k: list(TOOL_NAMES).index(k) if k in TOOL_NAMES else len(TOOL_NAMES)):
        versions = seen[key]
        if key == "llama.cpp":
            text = ", ".join(f"commit [{v}]({LLAMA_CPP_COMMIT}{v.split('-')[0]})" if v != "unknown" else v
                             for v in versions)
        else:
            text = ", ".join(versions)
        out.append({"name": TOOL_NAMES.get(key, key), "version": text})
    return out


def calibrations(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """Distinct calibration sets and the variants that used them (GPTQ/AWQ, or a GGUF importance matrix)."""
    found: dict[str, dict[str, Any]] = {}
    for m in manifests:
        c = m.calibration
        if not c:
            continue
        key = c.sha256 or repr(sorted(c.model_dump().items()))
        where = {"dataset": c.dataset, "config": c.config, "split": c.split, "file": c.file}
        where["source"] = None if any(where.values()) else str(c.source)  # older records: as recorded
        entry = found.setdefault(key, {**where, "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed,
                                       "sha256": c.sha256, "variants": []})
        entry["variants"].append(_label(m))
    return list(found.values())


def _label(m: Manifest) -> str:
    """How a card names a variant: its branch, or its GGUF type (Q4_K_M, Q4_K_L)."""
    if m.branch:
        return m.branch
    return getattr(backend(m.method).read_parameters(m.parameters), "name", None) or m.variant


def imatrices(manifests: list[Manifest], hub: str, repo: str) -> list[dict[str, Any]]:
    """The importance matrix files published beside GGUF files, with what they were computed from."""
    found: dict[str, dict[str, Any]] = {}
    for m in manifests:
        record = m.imatrix
        name = record.file if record else None
        if not name or name not in m.files:
            continue
        entry = found.setdefault(m.files[name].sha256, {
            "file": name, "url": f"{hub}/{repo}/blob/main/{name}", "datasets": record.datasets,
            "tensors": record.tensors, "tokens": record.tokens, "variants": []})
        entry["variants"].append(_label(m))
    return list(found.values())


def context(manifests: list[Manifest], hub: str, repo: str) -> dict[str, Any]:
    return {"tools": tools(manifests), "calibrations": calibrations(manifests),
            "imatrices": imatrices(manifests, hub, repo)}
