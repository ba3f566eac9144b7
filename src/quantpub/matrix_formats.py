"""The matrix sections of the runtimes' own formats: compressed-tensors (vLLM, SGLang) and MLX.

``compressed_tensors:`` lists llm-compressor's preset schemes as RedHatAI publishes them, one
repo each: ``W4A16`` (4-bit integer weights by GPTQ, groups of 128, 16-bit activations),
``W8A8`` (8-bit integer weights by GPTQ, one scale per output channel, activations quantized
to 8 bits per token at run time) and ``FP8_DYNAMIC`` (FP8 weights, one scale per output
channel, FP8 activations per token at run time; data-free). ``mlx:`` lists ``mlx_lm.convert``
quantizations (affine, ``bits`` and ``group_size``) as mlx-community publishes them.

Kept apart from ``matrix.py`` (which imports it) so each stays one screenful of schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantpub import naming

CtSchemeName = Literal["W4A16", "W8A8", "FP8_DYNAMIC"]
GPTQ_SCHEMES = ("W4A16", "W8A8")  # weights solved by GPTQ on calibration data; FP8_DYNAMIC needs none
DEFAULT_DAMP = naming.DEFAULT_DAMP


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CtScheme(_Strict):
    """One compressed-tensors variant.

    ``group_size`` (W4A16 only; 128 by default) and ``act_order``: ``group_aware`` (the default
    for W4A16: columns solved in order of activation importance, groups kept contiguous, the
    ordering llm-compressor's GPTQ applies by default as ``actorder: static``), ``true`` (W8A8
    only, its default: with one scale per channel the ordering changes no layout) or ``false``.
    ``damp``: GPTQ's dampening fraction (llm-compressor's ``dampening_frac``, 0.01).
    """

    scheme: CtSchemeName
    group_size: Literal[32, 64, 128] | None = None
    act_order: bool | Literal["group_aware"] | None = None
    damp: Annotated[float, Field(gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _fits_the_scheme(self) -> CtScheme:
        given = {f for f in ("group_size", "act_order", "damp") if getattr(self, f) is not None}
        if self.scheme == "FP8_DYNAMIC" and given:
            raise ValueError(f"FP8_DYNAMIC is data-free (no GPTQ, one scale per channel); remove "
                             f"{', '.join(sorted(given))}")
        if self.scheme == "W8A8" and self.group_size is not None:
            raise ValueError("W8A8 has one scale per output channel; remove group_size")
        if self.scheme == "W8A8" and self.act_order == "group_aware":
            raise ValueError("group_aware reorders within groups and W8A8 has none; use act_order: true")
        if self.scheme == "W4A16" and self.act_order is True:
            raise ValueError("act_order: true with groups needs a g_idx, which vLLM's kernels and llm-compressor "
                             "deprecate; use act_order: group_aware (the same solve order, contiguous groups)")
        return self

    @property
    def resolved_group_size(self) -> int | None:
        """Columns per scale: 128 by default for W4A16, None (one scale per output channel) otherwise."""
        if self.scheme == "W4A16":
            return self.group_size or 128
        return None

    @property
    def resolved_act_order(self) -> bool | str:
        if self.scheme == "FP8_DYNAMIC":
            return False
        if self.act_order is None:
            return "group_aware" if self.scheme == "W4A16" else True
        return self.act_order

    @property
    def resolved_damp(self) -> float:
        return DEFAULT_DAMP if self.damp is None else self.damp

    @property
    def needs_calibration(self) -> bool:
        return self.scheme in GPTQ_SCHEMES

    @property
    def weight_bits(self) -> int:
        return {"W4A16": 4, "W8A8": 8, "FP8_DYNAMIC": 8}[self.scheme]

    def variant_id(self) -> str:
        return naming.ct_variant_id(self.scheme, self.resolved_group_size, self.resolved_act_order)


class CtSection(_Strict):
    """Each scheme at most once: RedHatAI publishes one repo per scheme, the files on main."""

    schemes: Annotated[list[CtScheme], Field(min_length=1)]

    @model_validator(mode="after")
    def _once_each(self) -> CtSection:
        seen: set[str] = set()
        for s in self.schemes:
            if s.scheme in seen:
                raise ValueError(f"scheme {s.scheme} is listed twice; each scheme is one repo")
            seen.add(s.scheme)
        return self


class MlxTarget(_Strict):
    """``mlx_lm.convert(quantize=True, q_bits=bits, q_group_size=group_size)``: affine, round to nearest."""

    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: Literal[32, 64, 128] = 64

    def variant_id(self) -> str:
        return naming.mlx_variant_id(self.bits, self.group_size)


class MlxSection(_Strict):
    targets: Annotated[list[MlxTarget], Field(min_length=1)]

    @model_validator(mode="after")
    def _once_each(self) -> MlxSection:
        ids = [t.variant_id() for t in self.targets]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice")
        return self


def _repo_template(template: str, **placeholders: object) -> str:
    try:
        name = template.format(model_name="m", **placeholders)
    except (KeyError, IndexError, ValueError) as exc:
        allowed = ", ".join("{" + p + "}" for p in ("model_name", *placeholders))
        raise ValueError(f"{template!r}: the placeholders are {allowed} ({exc})") from None
    if "/" in name or not naming.is_valid_branch(name):
        raise ValueError(f"{template!r} does not give a valid repo name")
    return template


class CtRepos(_Strict):
    """Repo name per scheme, as RedHatAI names them."""

    W4A16: str = naming.CT_REPO_TEMPLATES["W4A16"]
    W8A8: str = naming.CT_REPO_TEMPLATES["W8A8"]
    FP8_DYNAMIC: str = naming.CT_REPO_TEMPLATES["FP8_DYNAMIC"]

    @field_validator("W4A16", "W8A8", "FP8_DYNAMIC")
    @classmethod
    def _template(cls, template: str) -> str:
        return _repo_template(template)


def mlx_repo_template(template: str) -> str:
    """Validate an MLX repo template: ``{model_name}``, ``{bits}``, ``{group_size}``; it must name ``{bits}``."""
    _repo_template(template, bits=4, group_size=64)
    if "{bits}" not in template:
        raise ValueError(f"{template!r} must contain {{bits}}: each MLX width is its own repo")
    return template
