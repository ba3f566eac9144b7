"""Repo cards rendered from recorded facts: the variants' manifests, the run record, the source model.

Every number in a card comes from a file: sizes from the manifests (which the worker computed
from the files themselves), parameters and calibration from the manifests, quality from the
evaluation stage when it has run. Nothing is typed by hand; what is not known is not shown.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantpub.artifacts import CARDS_DIR, MANIFEST, RUN_RECORD, write_text_atomic
from quantpub.card import formats, provenance, quality
from quantpub.card.chart import CHART, write_chart
from quantpub.card.prompt import PromptTemplate, detect
from quantpub.formatting import gb

log = logging.getLogger(__name__)
HUB = "https://huggingface.co"
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


@dataclass
class Source:
    model: str                      # what the run was given (hub id or local path)
    repo_id: str | None             # hub id of the original, when known
    name: str
    creator: str | None
    model_type: str
    card_meta: dict[str, Any] = field(default_factory=dict)
    card_body: str | None = None
    prompt: PromptTemplate = field(default_factory=lambda: detect(override=None, chat_template=None, card_text=None))


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n?", text, re.S)
    if not match:
        return {}, text
    meta = yaml.safe_load(match.group(1)) or {}
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def read_source(model: str, settings: dict[str, Any]) -> Source:
    """Facts about the source model: its card, chat template, config; matrix ``card:`` settings win."""
    files = _source_files(model)
    config = json.loads(files.get("config.json") or "{}")
    meta, body = split_front_matter(files["README.md"]) if files.get("README.md") else ({}, None)
    chat_template = files.get("chat_template.jinja") or json.loads(files.get("tokenizer_config.json") or "{}").get(
        "chat_template")
    if isinstance(chat_template, list):  # named templates: use the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    repo_id = settings.get("base_model") or (model if _is_hub_id(model) else None)
    base = (repo_id or model).rstrip("/").rsplit("/", 1)[-1]
    name = settings.get("model_name") or meta.get("model_name") or base
    creator = settings.get("model_creator") or meta.get("model_creator") or (repo_id.split("/")[0] if repo_id else None)
    prompt = detect(override=settings.get("prompt_template"), chat_template=chat_template,
                    card_text=files.get("README.md"))
    return Source(model, repo_id, name, creator, config.get("model_type", "unknown"), meta, body, prompt)


def _is_hub_id(model: str) -> bool:
    return not Path(model).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None


def _source_files(model: str) -> dict[str, str]:
    names = ("README.md", "config.json", "tokenizer_config.json", "chat_template.jinja")
    if Path(model).is_dir():
        return {n: (Path(model) / n).read_text() for n in names if (Path(model) / n).is_file()}
    from huggingface_hub import hf_hub_download

    files = {}
    for n in names:
        try:
            files[n] = Path(hf_hub_download(model, n)).read_text()
        except Exception as exc:  # noqa: BLE001 - missing file or offline: the card says less
            log.info("card: %s of %s not available (%s)", n, model, type(exc).__name__)
    return files


# table rows
def dataset_cell(calib: dict[str, Any] | None, hub: str = HUB) -> str:
    """The calibration dataset, linked on huggingface.co where it lives (whatever hub the card is for)."""
    if not calib:
        return "-"
    source = str(calib["source"])
    match = re.fullmatch(r"([\w./-]+?)/([\w.-]+):(\w+)", source)
    if match and not Path(source.split(":")[0]).exists():
        dataset, config, split = match.groups()
        return f"[{dataset}]({hub}/datasets/{dataset}/viewer/{config}/{split})"
    return f"{Path(source).name} (local file)"


def _measured(m: dict, q: dict[str, Any] | None) -> dict[str, Any]:
    """The per-format tables' quality cells of one variant (formatted as in the comparison table)."""
    ev = m.get("evaluation")
    if not ev or q is None:
        return {"eval": None, "ppl": "-", "kld": "-", "memory": "-", "rank": None}
    return {"eval": ev, "ppl": quality.fmt(ev["perplexity"], q["ppl_digits"]), "kld": quality.fmt(ev["kld"], q["kld_digits"]),
            "memory": quality.memory_cell(ev, q["memory_unit"]), "rank": q["ranks"].get(m["variant"])}


def gptq_rows(manifests: list[dict], model_type: str, hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    rows = []
    for m in manifests:
        p = m["parameters"]
        rows.append({
            "branch": m["branch"], "url": f"{hub}/{repo}/tree/{m['branch']}", "bits": p["bits"],
            "gs": p["group_size"] if p["group_size"] is not None else "None",
            "act_order": ACT_ORDER_CELL[p["act_order"]], "damp": p["damp"],
            "dataset": dataset_cell(m["calibration"]), "seq_len": m["calibration"]["seq_len"],
            "size": gb(m["size"]), "exllama": "Yes, untested" if p["bits"] == 4 and model_type in LLAMA_FAMILY else "No",
            "desc": gptq_desc(p, [x["parameters"] for x in manifests]), "tested": loaded_in_cell(m), **_measured(m, q)})
    return rows


def loaded_in_cell(manifest: dict[str, Any]) -> str:
    """The runtimes a branch loaded in, from its manifest's compatibility results."""
    from quantpub.compat import loaded_in

    if not (manifest.get("compat") or {}).get("runtimes"):
        return "not tested"
    return ", ".join(loaded_in(manifest)) or "none tested here"


def compat_section(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The Compatibility section: per runtime tried, the branches that loaded and the ones that failed, with why."""
    from quantpub.compat import LOADS, NOT_TESTED, RUNTIMES, TOLERANCE

    rows, untested = [], []
    results = [(m.get("branch") or m["variant"], (m.get("compat") or {}).get("runtimes") or {}) for m in manifests]
    for rt in RUNTIMES:
        found = [(branch, r[rt.name]) for branch, r in results if rt.name in r]
        tested = [(b, r) for b, r in found if r["status"] != NOT_TESTED]
        if not tested:
            if found:
                untested.append(f"{rt.name} (not installed where the files were made)")
            continue
        label = next((r["label"] for _, r in tested if r["status"] == LOADS), tested[0][1].get("label", rt.name))
        kind = "tokenizer: " if rt.mode == "tokenizer" else ""
        fails = [f"{b}: `{_cell_text(r.get('error', ''))}`" for b, r in tested if r["status"] != LOADS]
        rows.append({"label": kind + label, "loads": ", ".join(b for b, r in tested if r["status"] == LOADS) or "-",
                     "fails": "<br>".join(fails) or "-"})
    devices = sorted({r.get("device", "cpu").split(":")[0].upper() for _, rs in results for r in rs.values()
                      if r["status"] == LOADS and r.get("mode") == "model"}) or ["CPU"]
    reference = next((r["label"] for _, rs in results for n, r in rs.items() if n == "transformers5" and "label" in r),
                     "transformers")
    untested.insert(0, "ExLlama, ExLlamaV2 and Hugging Face Text Generation Inference (TGI), which need a GPU; "
                       "none loaded these files")
    return {"tested": bool(rows), "rows": rows, "untested": "; ".join(untested), "devices": " and ".join(devices),
            "reference": reference, "tolerance": TOLERANCE}


def _cell_text(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gptq_desc(p: dict[str, Any], siblings: list[dict[str, Any]]) -> str:
    """TheBloke's description: what the parameters are, and what they trade against the siblings."""
    act = {True: "with Act Order", False: "without Act Order",
           "group_aware": "with group-aware Act Order (desc_act False, which vLLM accepts)"}[p["act_order"]]
    gs = p["group_size"]
    text = f"{p['bits']}-bit, {act}" + (f" and group size {gs}g." if gs else ".")
    same = sorted({s["group_size"] for s in siblings if s["bits"] == p["bits"] and s["group_size"]})
    if gs is None:
        return text + " No group size, to lower VRAM requirements."
    if len(same) > 1 and gs == same[0]:
        return text + " Gives highest possible inference quality, with maximum VRAM usage."
    if len(same) > 1:
        smaller = same[same.index(gs) - 1]
        return text + f" Uses less VRAM than {smaller}g, but with slightly lower accuracy."
    return text


def awq_rows(manifests: list[dict], hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    return [{"branch": m["branch"], "url": f"{hub}/{repo}/tree/{m['branch']}", "bits": m["parameters"]["bits"],
             "gs": m["parameters"]["group_size"], "dataset": dataset_cell(m["calibration"]),
             "seq_len": m["calibration"]["seq_len"], "size": gb(m["size"]), **_measured(m, q)}
            for m in manifests]


def gguf_method(p: dict[str, Any]) -> str:
    """The quant method cell: llama.cpp's type, and the overrides a named variant adds (bartowski's _L)."""
    name, base = p.get("name", p["type"]), p["type"]
    extra = [f"{what} {p[key]}" for key, what in (("token_embedding_type", "embeddings"),
                                                  ("output_tensor_type", "output")) if p.get(key)]
    extra += [f"`{t}`" for t in p.get("tensor_types", [])]
    text = name if name == base and not extra else f"{name}: {base}" + (f" with {', '.join(extra)}" if extra else "")
    return text + (" (imatrix)" if p.get("imatrix") else "")


def gguf_rows(manifests: list[dict], hub: str, repo: str, q=None) -> list[dict[str, Any]]:
    rows = []
    for m in manifests:
        p = m["parameters"]
        files = sorted(n for n in m["files"] if n.endswith(".gguf"))
        measured = _measured(m, q)
        rule = measured["memory"] == "-"
        rows.append({"name": files[0] if len(files) == 1 else f"{files[0]} ... ({len(files)} parts)",
                     "url": f"{hub}/{repo}/blob/main/{files[0]}", "files": files, "method": gguf_method(p),
                     "imatrix": p.get("imatrix", False), "bits": int(re.search(r"\d+", p["type"]).group()),
                     "size": gb(m["size"]), "ram": f"{gb(m['size'] + GGUF_RAM_OVERHEAD)} (rule)" if rule
                     else measured["memory"].removesuffix(" RAM"), "ram_rule": rule,
                     "use": f"KLD rank {measured['rank']} of {q['count']}" if measured["rank"] else
                     GGUF_USE.get(p["type"], "-"), **measured})
    return rows


# the card
def card_data(kind: str, source: Source, manifests: list[dict], quantized_by: str | None):
    """The YAML front matter, as huggingface_hub.ModelCardData."""
    from huggingface_hub import EvalResult, ModelCardData

    meta = {k: source.card_meta[k] for k in CARRIED_META if source.card_meta.get(k)}
    evals = []
    for m in manifests:
        ev = m.get("evaluation")
        if not ev:
            continue
        label = m.get("branch") or m["variant"]
        for metric, value in (("perplexity", ev["perplexity"]), ("kl_divergence", ev["kld"])):
            evals.append(EvalResult(task_type="text-generation", dataset_type=ev["dataset"],
                                    dataset_name=ev["dataset_name"], dataset_split=ev.get("split"),
                                    metric_type=metric, metric_value=float(f"{float(value):.6g}"),
                                    metric_name=f"{metric} ({label})"))
    data = ModelCardData(
        base_model=source.repo_id, base_model_relation="quantized" if source.repo_id else None,
        model_creator=source.creator, model_name=source.name, model_type=source.model_type,
        pipeline_tag="text-generation", library_name=formats.LIBRARY.get(kind, "transformers"),
        tags=formats.tags(kind, manifests), inference=False,
        quantized_by=quantized_by, prompt_template=source.prompt.template if source.prompt.known else None,
        eval_results=evals or None, **meta)
    return data


def render(kind: str, repo: str, manifests: list[dict], source: Source, *, repos: list[str],
           quantized_by: str | None = "quantpub", hub: str = HUB, family: list[dict] | None = None,
           chart: str | None = None) -> str:
    """The README.md of one published repo (kind: gptq, awq, gguf, compressed_tensors or mlx).

    ``family``: the manifests of every repo of the model (default: ``manifests``), for the
    comparison table and "Which file should I choose?"; ``chart``: the file name of the
    KLD-against-size chart beside the card, when one was drawn. ``hub`` is the URL links point
    to; "" gives site-relative links (``/ns/repo``), stable across the built-in hub's ports,
    with shell commands written against ``$HF_ENDPOINT``.
    """
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("quantpub.card", "templates"), undefined=StrictUndefined,
                      keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    manifests = sorted(manifests, key=lambda m: m.get("branch") != "main")  # main first, then as given
    q = quality.context(family or manifests, kind, hub)
    rows = {"gptq": lambda: gptq_rows(manifests, source.model_type, hub, repo, q),
            "awq": lambda: awq_rows(manifests, hub, repo, q), "gguf": lambda: gguf_rows(manifests, hub, repo, q),
            "compressed_tensors": lambda: formats.ct_rows(manifests, hub, repo, lambda m: _measured(m, q)),
            "mlx": lambda: formats.mlx_rows(manifests, hub, repo, lambda m: _measured(m, q))}[kind]()
    data = card_data(kind, source, manifests, quantized_by)
    body = env.get_template(f"{kind}.md.j2").render(
        kind=kind, repo=repo, hub=hub, shell_hub=hub or "$HF_ENDPOINT", source_hub=HUB, source=source, rows=rows, repos=_repo_links(repos, hub),
        evaluated=any(r["eval"] for r in rows), measured_memory=any(r["memory"] != "-" for r in rows),
        quality=q, chart=chart if q else None, provenance=provenance.context(manifests, hub, repo),
        tools=manifests[0]["tools"], quantized_by=quantized_by, prompt=source.prompt,
        compat=compat_section(manifests) if kind in ("gptq", "awq") else None,
        tested=formats.tested_in(kind, manifests) if kind in formats.UNTESTED else None,
        python_prompt=source.prompt.template.replace("{system_message}", "You are a helpful assistant.")
        .replace("'''", "\\'\\'\\'"),
        original_title=f"{source.creator}'s {source.name}" if source.creator else source.name)
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _repo_links(repos: list[str], hub: str) -> list[dict[str, str]]:
    order = {"-AWQ": 0, "-GPTQ": 1, "-GGUF": 2}
    return [{"repo": r, "url": f"{hub}/{r}", "kind": next((k[1:] for k in order if r.endswith(k)), "")}
            for r in sorted(repos, key=lambda r: next((v for k, v in order.items() if r.endswith(k)), 9))]


def render_run(out: str | Path, *, hub: str = HUB, namespace: str | None = None) -> list[Path]:
    """Render ``OUT/cards/<repo name>/README.md`` for every repo of a finished run; returns the paths."""
    out = Path(out)
    record_path = out / RUN_RECORD
    if not record_path.is_file():
        from quantpub.errors import QuantpubError

        raise QuantpubError(f"{out}: no {RUN_RECORD}; render cards for a directory written by `quantpub quantize`")
    record = json.loads(record_path.read_text())
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob(f"*/{MANIFEST}")) if p.parent.name[0] != "."]
    order = {v: i for i, v in enumerate(record.get("variants", []))}
    manifests.sort(key=lambda m: order.get(m["variant"], len(order)))  # the matrix's order
    by_repo: dict[str, list[dict]] = {}
    for m in manifests:
        repo = m["repo"] if namespace is None else f"{namespace}/{m['repo'].split('/', 1)[1]}"
        by_repo.setdefault(repo, []).append({**m, "repo": repo})
    family = [m for ms in by_repo.values() for m in ms]
    source = read_source(record["model"], record.get("card") or {})
    points = quality.points(family, hub)
    paths = []
    for repo, ms in sorted(by_repo.items()):
        folder = out / CARDS_DIR / repo.split("/", 1)[1]
        folder.mkdir(parents=True, exist_ok=True)
        chart = folder / CHART
        if points:  # the same chart in every repo of the model, beside the card that shows it
            partial = folder / f".{CHART}.partial"
            write_chart(points, partial, f"{source.name}: mean KLD against size, every file")
            os.replace(partial, chart)
        else:
            chart.unlink(missing_ok=True)
        text = render(ms[0]["method"], repo, ms, source, repos=sorted(by_repo), family=family,
                      chart=CHART if points else None,
                      quantized_by=(record.get("card") or {}).get("quantized_by") or "quantpub", hub=hub)
        write_text_atomic(folder / "README.md", text)
        paths.append(folder / "README.md")
    return paths
