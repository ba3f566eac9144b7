"""The matrix file: a strict schema for the variants to build (``read_matrix``).

A typo is an error that names the file, line and key; nothing falls back to a silent default.
``variants`` expands a matrix into the variants to build. See ``matrices/thebloke.yaml`` for a
complete, commented example.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError,
    field_validator, model_serializer, model_validator,
)

from quantpub import naming, yamlfile
from quantpub.errors import MatrixError
from quantpub.matrix_formats import CtRepos, CtSection, MlxSection, mlx_repo_template
from quantpub.gguf_types import GgufVariant

Bits = Literal[2, 3, 4, 8]
Method = Literal["gptq", "awq", "gguf", "compressed_tensors", "mlx"]
GROUP_SIZES = (32, 64, 128)
PERPLEXITY_SPLIT = "test"


def _group_size(value: Any) -> int | None:
    """32 / 64 / 128, or none (also written -1 or null) for one group per column."""
    if value is None or value == -1 or (isinstance(value, str) and value.lower() == "none"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in GROUP_SIZES:
        raise ValueError(f"must be one of 32, 64, 128 or none (-1), got {value!r}")
    return value


GroupSize = Annotated[int | None, BeforeValidator(_group_size)]
# true: AutoGPTQ's desc_act. group_aware: GPTQModel's group-aware reordering, saved as desc_act false
# (act-order quality in the layout vLLM, Marlin and ExLlama kernels accept).
GROUP_AWARE = "group_aware"
ActOrder = bool | Literal["group_aware"]
Damp = Annotated[float, Field(gt=0, lt=1)]
SeqLen = int | Literal["auto"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    CALIBRATED_BY: typing.ClassVar[str] = ""  # how a plan says a variant uses its calibration windows

    def calibrated(self) -> bool:
        """Whether building the variant reads calibration windows (the matrix gives it a calibration)."""
        return True


class CalibrationSpec(Strict):
    """Where calibration text comes from; shared by GPTQ, AWQ and the GGUF importance matrix."""

    dataset: str = "wikitext"
    config: str | None = "wikitext-2-raw-v1"
    split: str = "train"
    text_column: str = "text"
    n_samples: Annotated[int, Field(gt=0)] = 128
    seq_len: SeqLen = "auto"
    seed: int = 0

    @field_validator("split")
    @classmethod
    def _not_the_perplexity_split(cls, split: str) -> str:
        if split == PERPLEXITY_SPLIT:
            raise ValueError(
                f"'{PERPLEXITY_SPLIT}' is the split perplexity is measured on; calibrate on 'train'"
            )
        return split

    @field_validator("seq_len")
    @classmethod
    def _positive(cls, seq_len: SeqLen) -> SeqLen:
        if seq_len != "auto" and seq_len <= 0:
            raise ValueError(f"must be a positive number of tokens or 'auto', got {seq_len}")
        return seq_len


class EvaluationSpec(Strict):
    """Held-out text that perplexity and KLD are measured on (never the calibration split)."""

    dataset: str = "wikitext"
    config: str | None = "wikitext-2-raw-v1"
    split: str = PERPLEXITY_SPLIT
    text_column: str = "text"
    context: Annotated[int, Field(gt=1)] = 512
    windows: Annotated[int, Field(gt=0)] = 8

    def as_text_source(self) -> CalibrationSpec:
        """The same text-loading description calibration uses (``calibration.load_text`` reads both)."""
        return CalibrationSpec.model_construct(dataset=self.dataset, config=self.config, split=self.split,
                                               text_column=self.text_column, n_samples=self.windows,
                                               seq_len=self.context, seed=0)


class GptqVariant(Strict):
    """One explicit GPTQ variant. ``branch`` overrides the generated name."""

    bits: Bits
    group_size: GroupSize = 128
    act_order: ActOrder = False
    damp: Damp = naming.DEFAULT_DAMP
    sym: bool = True
    dataset: str | None = None
    seq_len: SeqLen | None = None
    branch: str | None = None

    @model_validator(mode="after")
    def _group_aware_needs_groups(self) -> GptqVariant:
        if self.act_order == GROUP_AWARE and self.group_size is None:
            raise ValueError("act_order: group_aware reorders within groups and needs a group size; "
                             "with group_size none use act_order: true (every runtime accepts it there)")
        return self

    @field_validator("branch")
    @classmethod
    def _branch_ok(cls, branch: str | None) -> str | None:
        if branch is not None and (branch == naming.MAIN_BRANCH or not naming.is_valid_branch(branch)):
            raise ValueError(
                f"{branch!r} is not a usable branch name (letters, digits, '.', '_', '-'; "
                "select the main variant with gptq.main instead of naming it 'main')"
            )
        return branch

    def describe(self) -> str:
        group = "none" if self.group_size is None else self.group_size
        return (f"bits={self.bits} gs={group} act_order={self.act_order} damp={naming.format_number(self.damp)}"
                + ("" if self.sym else " asym"))

    def name_parts(self) -> naming.GptqNameParts:
        return naming.GptqNameParts(
            self.bits, self.group_size, self.act_order, self.damp, self.sym, self.dataset, self.seq_len
        )


class GptqProduct(Strict):
    """Every combination of these lists becomes a variant."""

    bits: Annotated[list[Bits], Field(min_length=1)]
    group_size: Annotated[list[GroupSize], Field(min_length=1)] = [128]
    act_order: Annotated[list[ActOrder], Field(min_length=1)] = [False]
    damp: Annotated[list[Damp], Field(min_length=1)] = [naming.DEFAULT_DAMP]
    sym: bool = True


class Selector(Strict):
    """Matches variants whose given fields all equal; fields left out match anything."""

    bits: Bits | None = None
    group_size: GroupSize = None
    act_order: ActOrder | None = None
    damp: Damp | None = None
    sym: bool | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Selector:
        if not self.model_fields_set:
            raise ValueError("an empty selector matches every variant; give at least one field")
        return self

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict:
        # A field left out means "any"; dumping it as null would mean "no group size".
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}

    def matches(self, variant: GptqVariant) -> bool:
        return all(getattr(variant, f) == getattr(self, f) for f in self.model_fields_set)


GptqMode = Literal["shared", "exact"]


class GptqSection(Strict):
    """``mode``: ``exact`` (the default) runs one calibration per variant, each layer fed by that
    variant's own quantized layers (GPTQModel's looper); ``shared`` calibrates once for all
    variants (each layer's Hessians from the unquantized model's activations): 2-3x faster for
    six branches, but up to 22% more KL divergence on SmolLM2-135M (benchmarks/gptq_modes.py)."""

    mode: GptqMode = "exact"
    product: GptqProduct | None = None
    variants: list[GptqVariant] = []
    exclude: list[Selector] = []
    main: Selector | None = None
    dataset: str | None = None
    seq_len: SeqLen | None = None
    n_samples: Annotated[int, Field(gt=0)] | None = None


class AwqTarget(Strict):
    """AutoAWQ's parameters; TheBloke published 4-bit, group 128, zero point, GEMM."""

    bits: Literal[4] = 4
    group_size: Literal[32, 64, 128] = 128
    zero_point: bool = True
    version: Literal["GEMM", "GEMV"] = "GEMM"

    def describe(self) -> str:
        return f"bits={self.bits} gs={self.group_size} zero_point={self.zero_point} {self.version}"


class AwqSection(Strict):
    """The first target is published on main, any others on their own branches."""

    targets: Annotated[list[AwqTarget], Field(min_length=1)] = [AwqTarget()]


class GgufSection(Strict):
    """llama.cpp files, all on the GGUF repo's main; ``imatrix`` computes one importance matrix
    from the calibration samples, uses it for every type and publishes it beside the files."""

    types: Annotated[list[GgufVariant], Field(min_length=1)]
    imatrix: bool = False
    file_name: str = naming.GGUF_FILE_TEMPLATE

    @model_validator(mode="after")
    def _check(self) -> GgufSection:
        seen = set()
        for t in self.types:
            if t.label in seen:
                raise ValueError(f"type {t.label} is listed twice")
            seen.add(t.label)
        needs = [t.label for t in self.types if t.needs_imatrix()]
        if needs and not self.imatrix:
            raise ValueError(f"{', '.join(needs)} need an importance matrix: set imatrix: true")
        return self

    @field_validator("file_name")
    @classmethod
    def _file_template(cls, template: str) -> str:
        try:
            name = naming.gguf_filename("m", "Q4_K_M", template)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{template!r}: the placeholders are {{model_name}} and {{type}} ({exc})") from None
        if "{type}" not in template or not name.endswith(".gguf") or "/" in name:
            raise ValueError(f"{template!r} must contain {{type}}, end in .gguf and name no folder")
        return template


class RepoSection(Strict):
    """Hub repo names; ``{model_name}`` is the source model's last path component.

    ``compressed_tensors``: one template per scheme (RedHatAI's names); ``mlx``: one template
    with ``{bits}`` (and optionally ``{group_size}``) for every MLX target.
    """

    namespace: str = "quantpub"
    gptq: str = "{model_name}-GPTQ"
    awq: str = "{model_name}-AWQ"
    gguf: str = "{model_name}-GGUF"
    compressed_tensors: CtRepos = CtRepos()
    mlx: str = naming.MLX_REPO_TEMPLATE

    @field_validator("mlx")
    @classmethod
    def _mlx_template(cls, template: str) -> str:
        return mlx_repo_template(template)

    @field_validator("gptq", "awq", "gguf")
    @classmethod
    def _template(cls, template: str) -> str:
        try:
            name = template.format(model_name="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{template!r}: the only placeholder is {{model_name}} ({exc})") from None
        if "/" in name or not naming.is_valid_branch(name):
            raise ValueError(f"{template!r} does not give a valid repo name")
        return template

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, namespace: str) -> str:
        if not naming.is_valid_branch(namespace):
            raise ValueError(f"{namespace!r} is not a valid hub namespace")
        return namespace


class CardSection(Strict):
    """Card facts the source model does not give."""

    quantized_by: str | None = None
    prompt_template: str | None = None
    model_name: str | None = None
    model_creator: str | None = None
    base_model: str | None = None  # hub id of the original when quantizing a local copy


class Matrix(Strict):
    calibration: CalibrationSpec = CalibrationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    gptq: GptqSection | None = None
    awq: AwqSection | None = None
    gguf: GgufSection | None = None
    repos: RepoSection = RepoSection()
    card: CardSection = CardSection()
    compressed_tensors: CtSection | None = None
    mlx: MlxSection | None = None


def read_matrix(path: str | Path) -> tuple[Matrix, dict]:
    """Read and validate a matrix file; also returns the line of every key (for the errors of ``variants``).

    Raises:
        MatrixError: naming the file, line and key of the first problem found.
    """
    data, lines = yamlfile.load(path)
    if data is None:
        raise MatrixError(str(path), "the file is empty; declare at least one of gptq, awq, gguf, "
                                     "compressed_tensors, mlx")
    if not isinstance(data, dict):
        raise MatrixError(str(path), f"expected a mapping of sections, got {type(data).__name__}", line=1)
    try:
        matrix = Matrix.model_validate(data)
    except ValidationError as exc:
        raise _matrix_error(path, exc, lines) from None
    same = (matrix.calibration.dataset, matrix.calibration.config, matrix.calibration.split)
    if same == (matrix.evaluation.dataset, matrix.evaluation.config, matrix.evaluation.split):
        raise MatrixError(str(path), "evaluation would score the text calibration was drawn from; use another "
                                     "split (or dataset) for evaluation", key="evaluation.split",
                          line=lines.get(("evaluation", "split")) or lines.get(("evaluation",)))
    return matrix, lines


def _matrix_error(path, exc: ValidationError, lines) -> MatrixError:
    errors = sorted(exc.errors(), key=lambda e: yamlfile.nearest_line(lines, tuple(e["loc"])) or 0)
    first = errors[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(Matrix, loc[:-1])
        message = f"unknown key; allowed here: {', '.join(allowed)}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] not in ("value_error", "missing") and "input" in first:
            message += f" (got {first['input']!r})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return MatrixError(str(path), message, key=key, line=yamlfile.nearest_line(lines, loc))


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the schema class found by walking ``loc`` down from ``model``."""
    current: Any = model
    for part in loc:
        current = _model_in(current)
        if current is None:
            return []
        if isinstance(part, str):
            current = current.model_fields[part].annotation
        # an int index: the element type is unwrapped by _model_in on the next step
    current = _model_in(current)
    return list(current.model_fields) if current else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside Optional[...] / list[...] / Annotated[...], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
