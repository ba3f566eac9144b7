"""Prompt template detection: matrix override, else the tokenizer's chat template, else the source card's prose.

Never a silent guess: when nothing matches, the template is "Unknown" and the plan says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNKNOWN = "Unknown"


@dataclass(frozen=True)
class PromptTemplate:
    name: str          # "ChatML", "Orca-Hashes", "Tulu", ... or "Unknown"
    template: str      # with {prompt} (and {system_message} where the format has one); "{prompt}" when unknown
    source: str        # "matrix", "chat_template", "model card" or "none"
    alternatives: tuple[str, ...] = ()  # other formats the card also documents

    @property
    def known(self) -> bool:
        return self.name != UNKNOWN


# Formats as they appear in prose: (name, markers that must all appear, the template).
CARD_FORMATS = [
    ("ChatML", ["<|im_start|>", "<|im_end|>"],
     "<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"),
    ("Orca-Hashes", ["### System:", "### User:", "### Response:"],
     "### System:\n{system_message}\n\n### User:\n{prompt}\n\n### Response:\n"),
    ("Tulu", ["<|user|>", "<|assistant|>"], "<|user|>\n{prompt}\n<|assistant|>\n"),
    ("Llama-2-Chat", ["[INST]", "[/INST]"], "[INST] {prompt} [/INST]"),
    ("Alpaca", ["### Instruction:", "### Response:"],
     "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
     "### Instruction:\n{prompt}\n\n### Response:\n"),
    ("Vicuna", ["USER:", "ASSISTANT:"], "A chat between a curious user and an artificial intelligence assistant. "
                                       "The assistant gives helpful, detailed, and polite answers to the user's "
                                       "questions. USER: {prompt} ASSISTANT:"),
]
CHAT_TEMPLATE_NAMES = [("ChatML", "<|im_start|>"), ("Llama-2-Chat", "[INST]"), ("Tulu", "<|user|>"),
                       ("Alpaca", "### Instruction"), ("Vicuna", "USER:")]


def detect(*, override: str | None, chat_template: str | None, card_text: str | None) -> PromptTemplate:
    if override:
        return PromptTemplate(_name_of(override) or "Custom", override, "matrix")
    if chat_template:
        rendered = render_chat_template(chat_template)
        if rendered is not None:
            return PromptTemplate(_name_of(chat_template) or "Custom", rendered, "chat_template")
    if card_text:
        body = _code_and_prose(card_text)
        found = [(name, template) for name, markers, template in CARD_FORMATS if all(m in body for m in markers)]
        if found:
            return PromptTemplate(found[0][0], found[0][1], "model card", tuple(n for n, _ in found[1:]))
    return PromptTemplate(UNKNOWN, "{prompt}", "none")


def render_chat_template(chat_template: str) -> str | None:
    """The chat template applied to one system and one user turn, with placeholders left in."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        template = env.from_string(chat_template)
        messages = [{"role": "system", "content": "{system_message}"}, {"role": "user", "content": "{prompt}"}]
        try:
            text = template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
        except TemplateError:  # some templates refuse a system turn
            text = template.render(messages=messages[1:], add_generation_prompt=True, bos_token="", eos_token="")
    except TemplateError:
        return None
    return text if "{prompt}" in text else None


def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _name_of(text: str) -> str | None:
    return next((name for name, marker in CHAT_TEMPLATE_NAMES if marker in text), None)


def _code_and_prose(card_text: str) -> str:
    return re.sub(r"^---\n.*?\n---\n", "", card_text, count=1, flags=re.S)
