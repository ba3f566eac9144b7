"""Repo cards rendered from recorded facts: the variants' manifests, the run record, the source model.

Every number in a card comes from a file: sizes from the manifests (which the worker computed
from the files themselves), parameters and calibration from the manifests, quality from the
evaluation stage when it has run. Nothing is typed by hand; what is not known is not shown.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any


from quantpub import naming
from quantpub.artifacts import CARDS_DIR, write_text_atomic
from quantpub.backends import backend
from quantpub.gguf_types import GgufParameters
from quantpub.manifest import Manifest, finished
from quantpub.matrix import GptqVariant
from quantpub.card import provenance, quality
from quantpub.card.chart import CHART, write_chart
from quantpub.source.card import Source
from quantpub.formatting import gb

log = logging.getLogger(__name__)
HUB = naming.HUB_URL
LLAMA_FAMILY = ("llama", "mistral")
CARRIED_META = ("license", "license_name", "license_link", "datasets", "language")
GGUF_USE = {  # llama.cpp's own descriptions of its types: as TheBloke's tables quoted them, else llama-quantize's list
    "Q2_K": "smallest, significant quality loss - not recommended for most purposes",
    "Q3_K_S": "very small, high quality loss", "Q3_K_M": "very small, high quality loss",
    "Q3_K_L": "small, substantial quality loss", "Q4_0": "legacy; small, very high quality loss - prefer using Q3_K_M",
    "Q4_K_S": "small, greater quality loss", "Q4_K_M": "medium, balanced quality - recommended",
    "Q5_0": "legacy; medium, balanced quality - prefer using Q4_K_M",
    "Q5_K_S": "large, low quality loss - recommended", "Q5_K_M": "large, very low quality loss - recommended",
    "Q6_K": "very large, extremely low quality loss", "Q8_0": "very large, extremely low quality loss - not recommended",
    "Q4_1": "4.78G, +0.4511 ppl @ Llama-3-8B", "Q5_1": "5.65G, +0.1062 ppl @ Llama-3-8B",
    "IQ1_S": "1.56 bpw quantization", "IQ1_M": "1.75 bpw quantization", "IQ2_XXS": "2.06 bpw quantization",
    "IQ2_XS": "2.31 bpw quantization", "IQ2_S": "2.5 bpw quantization", "IQ2_M": "2.7 bpw quantization",
    "IQ3_XXS": "3.06 bpw quantization", "IQ3_XS": "3.3 bpw quantization", "IQ3_S": "3.44 bpw quantization",
    "IQ3_M": "3.66 bpw quantization mix", "IQ4_NL": "4.50 bpw non-linear quantization",
    "IQ4_XS": "4.25 bpw non-linear quantization", "BF16": "16-bit, unquantised", "F16": "16-bit, unquantised",
}
GGUF_RAM_OVERHEAD = 2.5e9  # TheBloke's rule: file size + 2.5 GB, no GPU offload; only where nothing was measured
ACT_ORDER_CELL = {True: "Yes", False: "No", "group_aware": "Group-aware"}


# table rows
def _params(m: Manifest):
    return backend(m.method).read_parameters(m.parameters)


def gptq_rows(manifests: list[Manifest], source: Source, hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    rows = []
    for m in manifests:
        p = _params(m)
        rows.append({
            "branch": m.branch, "url": f"{hub}/{repo}/tree/{m.branch}", "bits": p.bits,
            "gs": p.group_size if p.group_size is not None else "None",
            "act_order": ACT_ORDER_CELL[p.act_order], "damp": p.damp,
            "dataset": quality.dataset_cell(m.calibration), "seq_len": m.calibration.seq_len,
            "size": gb(m.size), "exllama": "Yes, untested" if p.bits == 4 and source.model_type in LLAMA_FAMILY else "No",
            "desc": gptq_desc(p, [_params(x) for x in manifests]), "tested": loaded_in_cell(m), **quality.measured(m, q)})
    return rows


def loaded_in_cell(manifest: Manifest) -> str:
    """The runtimes a branch loaded in, from its manifest's compatibility results."""
    if not (manifest.compat and manifest.compat.runtimes):
        return "not tested"
    return ", ".join(manifest.loaded_in()) or "none tested here"


def compat_section(manifests: list[Manifest]) -> dict[str, Any]:
    """The Compatibility section: per runtime tried, the branches that loaded and the ones that failed, with why."""
    from quantpub.compat import EXACT, LOADS, NOT_TESTED, REFERENCE, RUNTIMES, TOLERANCE

    rows, untested = [], []
    results = [(m.branch or m.variant, m.compat.runtimes if m.compat else {}) for m in manifests]
    for rt in RUNTIMES:
        found = [(branch, r[rt.name]) for branch, r in results if rt.name in r]
        tested = [(b, r) for b, r in found if r.status != NOT_TESTED]
        if not tested:
            if found:
                untested.append(f"{rt.name} (not installed where the files were made)")
            continue
        label = next((r.label for _, r in tested if r.status == LOADS), tested[0][1].label or rt.name)
        kind = "tokenizer: " if rt.mode == "tokenizer" else ""
        fails = [f"{b}: `{_cell_text(r.error or '')}`" for b, r in tested if r.status != LOADS]
        rows.append({"label": kind + label, "loads": ", ".join(b for b, r in tested if r.status == LOADS) or "-",
                     "fails": "<br>".join(fails) or "-"})
    devices = sorted({(r.device or "cpu").split(":")[0].upper() for _, rs in results for r in rs.values()
                      if r.status == LOADS and r.mode == "model"}) or ["CPU"]
    reference = next((r.label for _, rs in results for n, r in rs.items() if n == REFERENCE and r.label),
                     "transformers")
    tolerance = TOLERANCE
    if manifests and all(m.compat and m.compat.reference == EXACT for m in manifests if m.compat and m.compat.runtimes):
        reference = "the weights dequantized exactly from the file's integers and scales (float32, no runtime's kernel)"
        tolerance = f"{TOLERANCE:g} of the largest logit"
    untested.insert(0, "ExLlama, ExLlamaV2 and Hugging Face Text Generation Inference (TGI), which need a GPU; "
                       "none loaded these files")
    return {"tested": bool(rows), "rows": rows, "untested": "; ".join(untested), "devices": " and ".join(devices),
            "reference": reference, "tolerance": tolerance}


def _cell_text(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gptq_desc(p: GptqVariant, siblings: list[GptqVariant]) -> str:
    """TheBloke's description: what the parameters are, and what they trade against the siblings."""
    act = {True: "with Act Order", False: "without Act Order",
           "group_aware": "with group-aware Act Order (desc_act False, which vLLM accepts)"}[p.act_order]
    gs = p.group_size
    text = f"{p.bits}-bit, {act}" + (f" and group size {gs}g." if gs else ".")
    same = sorted({s.group_size for s in siblings if s.bits == p.bits and s.group_size})
    if gs is None:
        return text + " No group size, to lower VRAM requirements."
    if len(same) > 1 and gs == same[0]:
        return text + " Gives highest possible inference quality, with maximum VRAM usage."
    if len(same) > 1:
        smaller = same[same.index(gs) - 1]
        return text + f" Uses less VRAM than {smaller}g, but with slightly lower accuracy."
    return text


def awq_rows(manifests: list[Manifest], source: Source, hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    return [{"branch": m.branch, "url": f"{hub}/{repo}/tree/{m.branch}", "bits": _params(m).bits,
             "gs": _params(m).group_size, "dataset": quality.dataset_cell(m.calibration),
             "seq_len": m.calibration.seq_len, "size": gb(m.size), **quality.measured(m, q)}
            for m in manifests]


def gguf_method(p: GgufParameters) -> str:
    """The quant method cell: llama.cpp's type, and the overrides a named variant adds (bartowski's _L)."""
    extra = [f"{what} {forced}" for forced, what in ((p.token_embedding_type, "embeddings"),
                                                     (p.output_tensor_type, "output")) if forced]
    extra += [f"`{t}`" for t in p.tensor_types]
    text = p.name if p.name == p.type and not extra else f"{p.name}: {p.type}" + (
        f" with {', '.join(extra)}" if extra else "")
    return text + (" (imatrix)" if p.imatrix else "")


def gguf_rows(manifests: list[Manifest], source: Source, hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    rows = []
    for m in manifests:
        p = _params(m)
        files = sorted(n for n in m.files if n.endswith(".gguf"))
        measured = quality.measured(m, q)
        rule = measured["memory"] == "-"
        rows.append({"name": files[0] if len(files) == 1 else f"{files[0]} ... ({len(files)} parts)",
                     "url": f"{hub}/{repo}/blob/main/{files[0]}", "files": files, "method": gguf_method(p),
                     "imatrix": p.imatrix, "bits": int(re.search(r"\d+", p.type).group()),
                     "size": gb(m.size), "ram": f"{gb(m.size + GGUF_RAM_OVERHEAD)} (rule)" if rule
                     else measured["memory"].removesuffix(" RAM"), "ram_rule": rule,
                     "use": f"KLD rank {measured['rank']} of {q['count']}" if measured["rank"] else
                     GGUF_USE.get(p.type, "-"), **measured})
    return rows


# the card
def card_data(kind: str, source: Source, manifests: list[Manifest], quantized_by: str | None):
    """The YAML front matter, as huggingface_hub.ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    meta = {k: source.card_meta[k] for k in CARRIED_META if source.card_meta.get(k)}
    evals = []
    for m in manifests:
        ev = m.evaluation
        if not ev:
            continue
        label = m.branch or m.variant
        for metric, value in (("perplexity", ev.perplexity), ("kl_divergence", ev.kld)):
            evals.append(EvalResult(task_type="text-generation", dataset_type=ev.dataset,
                                    dataset_name=ev.dataset_name, dataset_split=ev.split,
                                    metric_type=metric, metric_value=float(f"{float(value):.6g}"),
                                    metric_name=f"{metric} ({label})"))
    data = ModelCardData(
        base_model=source.repo_id, base_model_relation="quantized" if source.repo_id else None,
        model_creator=source.creator, model_name=source.name, model_type=source.model_type,
        pipeline_tag="text-generation", library_name=backend(kind).library_name,
        tags=backend(kind).card_function("tags")(manifests), inference=False,
        quantized_by=quantized_by, prompt_template=source.prompt.template if source.prompt.known else None,
        eval_results=evals or None, **meta)
    return data


def render(kind: str, repo: str, manifests: list[Manifest], source: Source, *, repos: list[str],
           quantized_by: str | None = "quantpub", hub: str = HUB, family: list[Manifest] | None = None,
           chart: str | None = None, parameters: int | None = None) -> str:
    """The README.md of one published repo (kind: gptq, awq, gguf, compressed_tensors or mlx).

    ``family``: the manifests of every repo of the model (default: ``manifests``), for the
    comparison table and "Which file should I choose?"; ``chart``: the file name of the
    KLD-against-size chart beside the card, when one was drawn; ``parameters``: the source's parameter count
    (the tables' bits per weight). ``hub`` is the URL links point
    to; "" gives site-relative links (``/ns/repo``), stable across the built-in hub's ports,
    with shell commands written against ``$HF_ENDPOINT``.
    """
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("quantpub.card", "templates"), undefined=StrictUndefined,
                      keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    manifests = sorted(manifests, key=lambda m: m.branch != "main")  # main first, then as given
    q = quality.context(family or manifests, repo, hub, parameters)
    b = backend(kind)
    rows = b.card_function("rows")(manifests, source, hub, repo, q)
    data = card_data(kind, source, manifests, quantized_by)
    body = env.get_template(backend(kind).card_template).render(
        kind=kind, repo=repo, hub=hub, shell_hub=hub or "$HF_ENDPOINT", source_hub=HUB, source=source, rows=rows, repos=_repo_links(repos, hub, family or manifests),
        evaluated=any(r["eval"] for r in rows), measured_memory=any(r["memory"] != "-" for r in rows),
        quality=q, chart=chart if q else None, provenance=provenance.context(manifests, hub, repo),
        tools=manifests[0].tools, quantized_by=quantized_by, prompt=source.prompt,
        compat=compat_section(manifests) if backend(kind).runtime == "transformers" else None,
        tested=b.card_function("tested")(manifests) if b.card_tested else None,
        python_prompt=source.prompt.template.replace("{system_message}", "You are a helpful assistant.")
        .replace("'''", "\\'\\'\\'"),
        original_title=f"{source.creator}'s {source.name}" if source.creator else source.name)
    return f"---\n{data.to_yaml()}\n---\n{body}"


REPO_LINES = {  # "Repositories available": what each format's repo is for (TheBloke's words for his three)
    "AWQ": "AWQ model(s) for GPU inference.",
    "GPTQ": "GPTQ models for GPU inference, with multiple quantisation parameter options.",
    "GGUF": "GGUF models for CPU+GPU inference with llama.cpp.",
    "compressed-tensors": "compressed-tensors {scheme} model for vLLM and SGLang.",
    "MLX": "MLX {bits}-bit model for Apple silicon (mlx-lm).",
}
ORDER = ("AWQ", "GPTQ", "GGUF", "compressed-tensors", "MLX")


def _repo_links(repos: list[str], hub: str, family: list[Manifest]) -> list[dict[str, str]]:
    """Every repo of the model with a line that says what it is for, from a manifest of it (else its name)."""
    links = []
    for r in repos:
        m = next((m for m in family if m.repo == r), None)
        if m is not None:
            kind = backend(m.method).kind
            line = REPO_LINES[kind].format_map(vars(_params(m)) if hasattr(_params(m), "__dict__") else {})
        else:
            kind = next((k for k in ("AWQ", "GPTQ", "GGUF") if r.endswith(f"-{k}")), "")
            line = REPO_LINES.get(kind, "")
        links.append({"repo": r, "url": f"{hub}/{r}", "kind": kind, "line": line})
    return sorted(links, key=lambda x: ORDER.index(x["kind"]) if x["kind"] in ORDER else len(ORDER))


def render_run(out: str | Path, *, hub: str = HUB, namespace: str | None = None) -> list[Path]:
    """Render ``OUT/cards/<repo name>/README.md`` for every repo of a finished run; returns the paths.

    The plan written there (``OUT/plan.json``) gives the matrix's card settings, the variants' order and what
    the source's card says; the variants' manifests give everything measured.
    """
    from quantpub.plan import load_plan

    out = Path(out)
    plan = load_plan(out)
    manifests = [m for _, m in finished(out)]
    order = {j.id: i for i, j in enumerate(plan.jobs)}
    manifests.sort(key=lambda m: order.get(m.variant, len(order)))  # the matrix's order
    by_repo: dict[str, list[Manifest]] = {}
    for m in manifests:
        repo = naming.in_namespace(m.repo, namespace)
        by_repo.setdefault(repo, []).append(m.model_copy(update={"repo": repo}))
    family = [m for ms in by_repo.values() for m in ms]
    source = plan.source
    points = quality.points(family, hub)
    paths = []
    for repo, ms in sorted(by_repo.items()):
        folder = out / CARDS_DIR / naming.repo_name(repo)
        folder.mkdir(parents=True, exist_ok=True)
        chart = folder / CHART
        if points:  # the same chart in every repo of the model, beside the card that shows it
            partial = folder / f".{CHART}.partial"
            write_chart(points, partial, f"{source.name}: mean KLD against size, every file")
            os.replace(partial, chart)
        else:
            chart.unlink(missing_ok=True)
        text = render(ms[0].method, repo, ms, source, repos=sorted(by_repo), family=family,
                      chart=CHART if points else None,
                      quantized_by=plan.matrix.card.quantized_by or "quantpub", hub=hub,
                      parameters=plan.facts.total_params)
        write_text_atomic(folder / "README.md", text)
        paths.append(folder / "README.md")
    return paths
