"""A model card as the hub's pages show it: its front matter, the ``model-index`` as evaluation
results (as the Hub shows them), and the Markdown body as sanitised HTML whose tables scroll
sideways inside the page. A card is user content: markdown-it-py renders it, nh3 cleans it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import nh3
import yaml
from markdown_it import MarkdownIt

from quantpub.yamlfile import front_matter

MAX_RESULTS = 500  # evaluation rows shown; a card may hold any number
_md = MarkdownIt("commonmark", {"html": True, "linkify": False}).enable(["table", "strikethrough"])
_TABLE = re.compile(r"<table(?:\s[^>]*)?>")


@dataclass
class Card:
    meta: dict = field(default_factory=dict)  # front matter a person reads: text, numbers, lists of them
    results: list[dict] = field(default_factory=list)  # model-index rows: model, task, dataset, metric, value
    html: str = ""


def render_card(text: str) -> Card:
    """The card of a README.md: unreadable front matter is left out, never an error."""
    yaml_text, body = front_matter(text)
    try:
        loaded = yaml.safe_load(yaml_text) if yaml_text else {}
    except yaml.YAMLError:
        loaded = {}
    meta = loaded if isinstance(loaded, dict) else {}
    html = nh3.clean(_md.render(body), link_rel="noopener nofollow")
    html = _TABLE.sub(lambda m: f'<div class="table-scroll">{m.group()}', html).replace("</table>", "</table></div>")
    shown = {str(k): v for k, v in meta.items() if k != "model-index" and _readable(v)}
    return Card(shown, evaluation_results(meta.get("model-index")), html)


def _readable(value: object) -> bool:
    scalar = (str, int, float)
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def evaluation_results(index: object) -> list[dict]:
    """The rows of a ``model-index`` (``[{name, results: [{task, dataset, metrics: [...]}]}]``); entries
    that are not of that shape are skipped."""
    rows = []
    for model in index if isinstance(index, list) else []:
        if not isinstance(model, dict):
            continue
        for result in model.get("results") if isinstance(model.get("results"), list) else []:
            if not isinstance(result, dict):
                continue
            task, dataset = _mapping(result.get("task")), _mapping(result.get("dataset"))
            where = " ".join(str(dataset[k]) for k in ("name", "config", "split") if _text(dataset.get(k)))
            for metric in result.get("metrics") if isinstance(result.get("metrics"), list) else []:
                metric = _mapping(metric)
                if not _text(metric.get("value")) or len(rows) >= MAX_RESULTS:
                    continue
                rows.append({"model": str(model.get("name", "")) if _text(model.get("name")) else "",
                             "task": str(task.get("name") or task.get("type") or ""), "dataset": where,
                             "metric": str(metric.get("name") or metric.get("type") or ""),
                             "value": str(metric["value"]), "verified": metric.get("verified") is True})
    return rows


def _mapping(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)
