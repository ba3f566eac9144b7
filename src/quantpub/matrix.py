"""The matrix file: a strict schema for the variants to build, expanded into ``VariantSpec``s.

A typo is an error that names the file, line and key; nothing falls back to a silent default.
See ``matrices/thebloke.yaml`` for a complete, commented example.
"""

from __future__ import annotations

import itertools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError,
    field_validator, model_serializer, model_validator,
)

from quantpub import naming, yamlfile
from quantpub.errors import MatrixError
from quantpub.matrix_formats import CtRepos, CtScheme, CtSection, MlxSection, MlxTarget, mlx_repo_template
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


@dataclass(frozen=True)
class VariantSpec:
    """One variant to build, before any model is known."""

    id: str
    method: Method
    origin: str  # where in the matrix it came from, for error messages
    branch: str | None  # None for GGUF: files on main
    params: GptqVariant | AwqTarget | GgufVariant | CtScheme | MlxTarget
    calibration: CalibrationSpec | None  # None: needs no calibration


SHIPPED = Path(__file__).parent / "matrices"  # the repository's matrices/, installed as package data


def shipped_matrices() -> dict[str, tuple[Path, str]]:
    """Name -> (path, first comment line) of every matrix that ships with quantpub."""
    found = {}
    for path in sorted(SHIPPED.glob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")), "")
        found[path.stem] = (path, first)
    return found


def resolve_matrix(ref: str | Path) -> Path:
    """A matrix path from a path, or from the name of a shipped matrix (``thebloke``).

    Raises:
        MatrixError: neither a file nor a shipped matrix's name.
    """
    path = Path(ref)
    if path.is_file():
        return path.resolve()
    shipped = shipped_matrices()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped and (path.parent == Path(".") or path.parent.name == "matrices"):
        return shipped[name][0].resolve()
    raise MatrixError(str(ref), "no such file, and no shipped matrix of that name; shipped: "
                                f"{', '.join(shipped)} (see `quantpub matrices`)")


def load_matrix(path: str | Path) -> tuple[Matrix, list[VariantSpec]]:
    """Read, validate and expand a matrix file.

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
    _check_mlx_repos(matrix, path, lines)
    return matrix, expand(matrix, path, lines)


def expand(matrix: Matrix, path: str | Path = "<matrix>", lines: dict | None = None) -> list[VariantSpec]:
    """All variants of ``matrix`` in publication order: GPTQ, AWQ, GGUF, compressed-tensors, MLX."""
    lines = lines or {}
    specs = _gptq_specs(matrix, path, lines) + _awq_specs(matrix) + _gguf_specs(matrix) + runtime_specs(matrix)
    if not specs:
        raise MatrixError(str(path), "the matrix declares no variants; add gptq, awq, gguf, compressed_tensors "
                                     "or mlx entries")
    return specs


def runtime_specs(matrix: Matrix) -> list[VariantSpec]:
    """The compressed-tensors and MLX variants of ``matrix``: each on ``main`` of its own repo.

    W4A16 and W8A8 calibrate on the matrix's calibration; FP8_DYNAMIC and MLX need none.
    """
    specs = []
    for i, s in enumerate(matrix.compressed_tensors.schemes if matrix.compressed_tensors else []):
        specs.append(VariantSpec(id=s.variant_id(), method="compressed_tensors", origin=f"compressed_tensors.schemes[{i}]",
                                 branch=naming.MAIN_BRANCH, params=s,
                                 calibration=matrix.calibration if s.needs_calibration else None))
    for i, t in enumerate(matrix.mlx.targets if matrix.mlx else []):
        specs.append(VariantSpec(id=t.variant_id(), method="mlx", origin=f"mlx.targets[{i}]",
                                 branch=naming.MAIN_BRANCH, params=t, calibration=None))
    return specs


def _check_mlx_repos(matrix: Matrix, path, lines) -> None:
    """Two MLX targets must not land in one repo (each repo holds one quantization on main)."""
    seen: dict[str, int] = {}
    for i, t in enumerate(matrix.mlx.targets if matrix.mlx else []):
        name = naming.mlx_repo_name(matrix.repos.mlx, "m", t.bits, t.group_size)
        if name in seen:
            raise MatrixError(str(path), f"mlx.targets[{seen[name]}] and mlx.targets[{i}] would share one repo "
                                         f"under repos.mlx {matrix.repos.mlx!r}; add {{group_size}} to the template",
                              key="mlx.targets", line=lines.get(("mlx", "targets")) or lines.get(("mlx",)))
        seen[name] = i


def runtime_repo(matrix: Matrix, spec: VariantSpec, model_name: str) -> str:
    """``namespace/name`` of a compressed-tensors or MLX variant's repo."""
    repos = matrix.repos
    p = spec.params
    if isinstance(p, CtScheme):
        return naming.repo_id(repos.namespace, getattr(repos.compressed_tensors, p.scheme), model_name)
    if isinstance(p, MlxTarget):
        return f"{repos.namespace}/{naming.mlx_repo_name(repos.mlx, model_name, p.bits, p.group_size)}"
    raise ValueError(f"{spec.id}: {spec.method} is not a runtime format")


def _gptq_specs(matrix: Matrix, path, lines) -> list[VariantSpec]:
    section = matrix.gptq
    if section is None:
        return []
    found: list[tuple[str, GptqVariant]] = []
    if section.product is not None:
        p = section.product
        for bits, group, act, damp in itertools.product(p.bits, p.group_size, p.act_order, p.damp):
            try:
                variant = GptqVariant(bits=bits, group_size=group, act_order=act, damp=damp, sym=p.sym)
            except ValidationError as exc:
                raise MatrixError(str(path), exc.errors()[0]["msg"].removeprefix("Value error, "),
                                  key="gptq.product", line=lines.get(("gptq", "product"))) from None
            if not any(rule.matches(variant) for rule in section.exclude):
                found.append(("gptq.product", variant))
    found += [(f"gptq.variants[{i}]", v) for i, v in enumerate(section.variants)]
    if not found:
        raise MatrixError(str(path), "no GPTQ variant is left; check gptq.product, gptq.variants and gptq.exclude",
                          key="gptq", line=lines.get(("gptq",)))

    ids = naming.gptq_variant_ids([v.name_parts() for _, v in found])
    ids = [v.branch or generated for (_, v), generated in zip(found, ids)]
    first_origin: dict[str, str] = {}
    for (origin, variant), vid in zip(found, ids):
        if vid in first_origin:
            raise MatrixError(
                str(path),
                f"{first_origin[vid]} and {origin} ({_describe(variant)}) would share branch {vid}; "
                "remove one or set a distinct branch: on the explicit variant",
                key="gptq", line=lines.get(("gptq",)),
            )
        first_origin[vid] = origin

    main_index = _main_index(section, found, path, lines)
    calibration = matrix.calibration.model_copy(update={
        k: v for k, v in (("dataset", section.dataset), ("seq_len", section.seq_len),
                          ("n_samples", section.n_samples)) if v is not None
    })
    specs = []
    order = [main_index] + [i for i in range(len(found)) if i != main_index]  # main is published first
    for i in order:
        (origin, variant), vid = found[i], ids[i]
        own = {k: v for k, v in (("dataset", variant.dataset), ("seq_len", variant.seq_len)) if v is not None}
        specs.append(VariantSpec(
            id=vid, method="gptq", origin=origin, branch=naming.gptq_branch(vid, i == main_index),
            params=variant, calibration=calibration.model_copy(update=own),
        ))
    return specs


def _main_index(section: GptqSection, found, path, lines) -> int:
    if section.main is None:
        return 0
    hits = [i for i, (_, v) in enumerate(found) if section.main.matches(v)]
    if len(hits) != 1:
        which = "no variant" if not hits else f"{len(hits)} variants ({', '.join(found[i][0] for i in hits)})"
        raise MatrixError(str(path), f"matches {which}; it must select exactly one",
                          key="gptq.main", line=lines.get(("gptq", "main")))
    return hits[0]


def _awq_specs(matrix: Matrix) -> list[VariantSpec]:
    if matrix.awq is None:
        return []
    specs = []
    for i, t in enumerate(matrix.awq.targets):
        vid = naming.awq_variant_id(t.bits, t.group_size, t.zero_point, t.version)
        specs.append(VariantSpec(
            id=vid, method="awq", origin=f"awq.targets[{i}]",
            branch=naming.MAIN_BRANCH if i == 0 else vid, params=t, calibration=matrix.calibration,
        ))
    return specs


def _gguf_specs(matrix: Matrix) -> list[VariantSpec]:
    if matrix.gguf is None:
        return []
    calibration = matrix.calibration if matrix.gguf.imatrix else None
    return [
        VariantSpec(id=naming.gguf_variant_id(t.label), method="gguf", origin=f"gguf.types[{i}]",
                    branch=None, params=t, calibration=calibration)
        for i, t in enumerate(matrix.gguf.types)
    ]


def _describe(v: GptqVariant) -> str:
    group = "none" if v.group_size is None else v.group_size
    return f"bits={v.bits}, group_size={group}, act_order={v.act_order}, damp={naming.format_number(v.damp)}"


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
