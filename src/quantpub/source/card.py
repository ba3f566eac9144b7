"""What a source model says about itself beyond its config: its card (front matter and prose), its chat
template, its hub id, its creator; with the matrix's ``card:`` settings, which win."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantpub.source.prompt import PromptTemplate, detect
from quantpub.yamlfile import front_matter

log = logging.getLogger(__name__)


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
    """The card's front matter as data (empty when there is none or it is not a mapping) and its body."""
    yaml_text, body = front_matter(text)
    meta = (yaml.safe_load(yaml_text) or {}) if yaml_text else {}
    return (meta if isinstance(meta, dict) else {}), body


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
