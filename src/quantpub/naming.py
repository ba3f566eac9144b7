"""Names of branches, variants, repos and files: pure functions, one place.

TheBloke's conventions, reproduced exactly:

* GPTQ branch: ``gptq-{bits}bit-{group}g-actorder_{True|False}``, with ``-1`` for "no group
  size" (so ``gptq-8bit--1g-actorder_True``); the variant chosen for ``main`` is published on
  ``main`` instead.
* GGUF file: ``<model>.<TYPE>.gguf``; a file split with llama.cpp's split format is
  ``<model>.<TYPE>-00001-of-00003.gguf`` (the ``-%05d-of-%05d.gguf`` suffix llama.cpp expects).

Disambiguation rule (documented in README.md): TheBloke's GPTQ name only encodes bits, group
size and act order. When several variants of one matrix share that name, every one of them
whose other parameters differ from the defaults (damp 0.01, sym true, the matrix's calibration
dataset and sequence length) gets one suffix per differing parameter, in this order:
``-damp{d}``, ``-asym``, ``-{dataset}``, ``-seq{n}``. The variant with all defaults keeps the
plain name, so adding a sibling never renames an already published branch. Two variants that
still share a name are duplicates and the matrix is rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

HUB_URL = "https://huggingface.co"  # where published repos live; cards link here unless told otherwise

DEFAULT_DAMP = 0.01
MAIN_BRANCH = "main"

# Characters git and the Hub accept in a branch name without quoting (a strict subset).
_BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLUG_RE = re.compile(r"[^A-Za-z0-9._-]+")


def format_number(value: float) -> str:
    """Shortest exact text for a damp value: 0.01 -> '0.01', 0.1 -> '0.1', 1.0 -> '1'."""
    return f"{value:g}"


def slug(text: str) -> str:
    """A branch/file-safe form of free text: 'allenai/c4 en' -> 'allenai-c4-en'."""
    cleaned = _SLUG_RE.sub("-", text.replace("/", "-")).strip("-.")
    return cleaned or "x"


def gptq_base_name(bits: int, group_size: int | None, act_order: bool | str) -> str:
    """TheBloke's GPTQ branch name; ``group_size=None`` means no grouping (-1).

    ``act_order="group_aware"`` (GPTQModel's group-aware reordering, which TheBloke never
    published) is ``actorder_GroupAware``: it cannot be mistaken for a ``True``/``False`` branch.
    """
    group = -1 if group_size is None else group_size
    order = "GroupAware" if act_order == "group_aware" else act_order
    return f"gptq-{bits}bit-{group}g-actorder_{order}"


@dataclass(frozen=True)
class GptqNameParts:
    """Everything that can distinguish two GPTQ variants' names."""

    bits: int
    group_size: int | None
    act_order: bool | str
    damp: float = DEFAULT_DAMP
    sym: bool = True
    dataset: str | None = None  # None: the matrix's calibration dataset
    seq_len: int | str | None = None  # None: the matrix's calibration sequence length

    @property
    def base(self) -> str:
        return gptq_base_name(self.bits, self.group_size, self.act_order)

    def suffixes(self) -> list[str]:
        out = []
        if self.damp != DEFAULT_DAMP:
            out.append(f"damp{format_number(self.damp)}")
        if not self.sym:
            out.append("asym")
        if self.dataset is not None:
            out.append(slug(self.dataset))
        if self.seq_len is not None:
            out.append(f"seq{self.seq_len}")
        return out


def gptq_variant_ids(parts: list[GptqNameParts]) -> list[str]:
    """Variant ids for a list of GPTQ variants, disambiguated by the module's rule.

    Returns ids in the input order. Duplicates are left in place; the caller reports them
    (it knows which matrix entries they came from).
    """
    base_counts: dict[str, int] = {}
    for p in parts:
        base_counts[p.base] = base_counts.get(p.base, 0) + 1
    ids = []
    for p in parts:
        name = p.base
        if base_counts[p.base] > 1:
            name = "-".join([p.base, *p.suffixes()])
        ids.append(name)
    return ids


def gptq_branch(variant_id: str, is_main: bool) -> str:
    return MAIN_BRANCH if is_main else variant_id


def awq_variant_id(bits: int, group_size: int | None, zero_point: bool, version: str) -> str:
    """``awq-4bit-128g-GEMM`` (``-nozp`` appended when zero point is off)."""
    group = -1 if group_size is None else group_size
    name = f"awq-{bits}bit-{group}g-{version.upper()}"
    return name if zero_point else f"{name}-nozp"


def gguf_variant_id(quant_type: str) -> str:
    return f"gguf-{quant_type}"


GGUF_FILE_TEMPLATE = "{model_name}.{type}.gguf"  # TheBloke's; bartowski's is "{model_name}-{type}.gguf"
SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def gguf_filename(model_basename: str, quant_type: str, template: str = GGUF_FILE_TEMPLATE) -> str:
    """``tulu-7b.Q4_K_M.gguf`` (or as ``template`` says, with ``{model_name}`` and ``{type}``)."""
    return template.format(model_name=model_basename, type=quant_type)


def imatrix_filename(model_basename: str) -> str:
    """``tulu-7b.imatrix``: llama.cpp's GGUF imatrix format, named as bartowski names his (not
    ``.gguf``, so that no tool lists it as a model file)."""
    return f"{model_basename}.imatrix"


def gguf_stem(file_name: str) -> str:
    """The file name without ``.gguf`` and without llama.cpp's ``-00001-of-00003`` split suffix."""
    return SPLIT_SUFFIX.sub("", file_name).removesuffix(".gguf")


def gguf_split_filename(model_basename: str, quant_type: str, index: int, count: int) -> str:
    """Shard ``index`` (1-based) of ``count`` in llama.cpp's split naming."""
    if not 1 <= index <= count:
        raise ValueError(f"shard {index} of {count} is out of range")
    return f"{model_basename}.{quant_type}-{index:05d}-of-{count:05d}.gguf"


# Repos of the runtimes' own formats, named as their communities name them: RedHatAI's
# compressed-tensors repos (``Llama-3.1-8B-Instruct-quantized.w4a16``, ``-quantized.w8a8``,
# ``-FP8-dynamic``) and MLX repos outside mlx-community (``-MLX-4bit``, ``-MLX-8bit``; inside
# that organisation the name drops ``MLX-``).
CT_REPO_TEMPLATES = {"W4A16": "{model_name}-quantized.w4a16", "W8A8": "{model_name}-quantized.w8a8",
                     "FP8_DYNAMIC": "{model_name}-FP8-dynamic"}
MLX_REPO_TEMPLATE = "{model_name}-MLX-{bits}bit"


def ct_variant_id(scheme: str, group_size: int | None, act_order: bool | str) -> str:
    """``ct-w4a16-128g-actorder_GroupAware``, ``ct-w8a8-actorder_True``, ``ct-fp8-dynamic``."""
    if scheme == "FP8_DYNAMIC":
        return "ct-fp8-dynamic"
    order = "GroupAware" if act_order == "group_aware" else act_order
    group = f"-{group_size}g" if group_size is not None else ""
    return f"ct-{scheme.lower()}{group}-actorder_{order}"


def mlx_variant_id(bits: int, group_size: int) -> str:
    """``mlx-4bit-64g``."""
    return f"mlx-{bits}bit-{group_size}g"


def mlx_repo_name(template: str, model_name: str, bits: int, group_size: int) -> str:
    """``tulu-7b-MLX-4bit`` from ``{model_name}-MLX-{bits}bit`` (``{group_size}`` may appear too)."""
    return template.format(model_name=model_name, bits=bits, group_size=group_size)


def model_basename(model: str) -> str:
    """The last path component of a hub id or local directory: 'allenai/tulu-7b' -> 'tulu-7b'."""
    name = PurePosixPath(model.replace("\\", "/").rstrip("/")).name
    if not name:
        raise ValueError(f"cannot take a model name from {model!r}")
    return name


def repo_id(namespace: str, template: str, model_name: str) -> str:
    """``{namespace}/{template with {model_name} filled in}``."""
    return f"{namespace}/{template.format(model_name=model_name)}"


def is_valid_branch(name: str) -> bool:
    return bool(_BRANCH_RE.match(name)) and ".." not in name and not name.endswith((".lock", "."))


def repo_name(repo_id: str) -> str:
    """``name`` of ``namespace/name``."""
    return repo_id.split("/", 1)[1]


def in_namespace(repo_id: str, namespace: str | None) -> str:
    """``repo_id`` moved to ``namespace`` (``--namespace``); as it is when no namespace is given."""
    return f"{namespace}/{repo_name(repo_id)}" if namespace else repo_id
