"""llama.cpp's quantization types, what llama.cpp documents about them, and one GGUF variant of a matrix.

Two kinds of names: a *file type* (``Q4_K_M``, ``IQ3_M``: a mix llama.cpp chooses per tensor,
what ``llama-quantize`` takes as its type argument) and a *tensor type* (``Q4_K``, ``Q8_0``:
what one tensor is stored as, what ``--tensor-type``, ``--token-embedding-type`` and
``--output-tensor-type`` take). A matrix's GGUF variant is a file type, optionally with those
overrides and its own name (bartowski's ``Q4_K_L`` is ``Q4_K_M`` with token embeddings and
output at ``Q8_0``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, SerializerFunctionWrapHandler, model_serializer, \
    model_validator

FILE_TYPES = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
    "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS", "BF16", "F16",
)
TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
)
# llama.cpp refuses these tensor types without an importance matrix (llama-quant.cpp,
# tensor_requires_imatrix), and so the file types whose mix uses them.
TENSOR_NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
FILE_NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS"})
SIXTEEN_BIT = frozenset({"F16", "BF16"})

# Average bits per weight of a whole llama-family model in each file type, tensor mix included
# (llama.cpp's published sizes for Llama-2 7B, divided by its 6.74B parameters; i-quants from
# llama-quantize's own list).
FILE_BITS_PER_WEIGHT = {
    "Q2_K": 3.35, "Q3_K_S": 3.50, "Q3_K_M": 3.91, "Q3_K_L": 4.27, "Q4_0": 4.55, "Q4_1": 5.0,
    "Q4_K_S": 4.58, "Q4_K_M": 4.85, "Q5_0": 5.54, "Q5_1": 6.0, "Q5_K_S": 5.54, "Q5_K_M": 5.69,
    "Q6_K": 6.56, "Q8_0": 8.5, "IQ1_S": 1.56, "IQ1_M": 1.75, "IQ2_XXS": 2.06, "IQ2_XS": 2.31, "IQ2_S": 2.5,
    "IQ2_M": 2.7, "IQ3_XXS": 3.06, "IQ3_XS": 3.3, "IQ3_S": 3.44, "IQ3_M": 3.66, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "BF16": 16.0, "F16": 16.0,
}
# Bits per weight of one tensor stored in a tensor type (ggml's block sizes).
TENSOR_BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5,
    "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "IQ1_S": 1.5625, "IQ1_M": 1.75,
    "IQ2_XXS": 2.0625, "IQ2_XS": 2.3125, "IQ2_S": 2.5625, "IQ3_XXS": 3.0625, "IQ3_S": 3.4375, "IQ4_NL": 4.5,
    "IQ4_XS": 4.25,
}
# The order llama.cpp's documentation gives the file types, smallest and lossiest first:
# bits per weight of Llama-3.1-8B in tools/quantize/README.md, and for the legacy types it
# leaves out (Q4_0, Q4_1, Q5_0, Q5_1) the perplexity increase llama-quantize's own type list
# quotes for Llama-3-8B, placed between the neighbours with the nearest quoted increase.
DOCUMENTED_ORDER = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_XS", "Q3_K_S", "IQ3_S",
    "IQ3_M", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_0", "Q4_1", "Q4_K_S", "IQ4_NL", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "BF16", "F16",
)

FileType = Literal[FILE_TYPES]  # type: ignore[valid-type]
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _tensor_type(value: Any) -> Any:
    """A tensor type name, case-insensitive as llama-quantize reads it (``q8_0`` is ``Q8_0``)."""
    if isinstance(value, str):
        upper = value.upper()
        if upper not in TENSOR_TYPES:
            raise ValueError(f"{value!r} is not a llama.cpp tensor type; use one of {', '.join(TENSOR_TYPES)} "
                             "(file types such as Q4_K_M are not tensor types: Q4_K_M stores most tensors as Q4_K)")
        return upper
    return value


def _tensor_override(value: Any) -> Any:
    """``PATTERN=TYPE`` as ``llama-quantize --tensor-type`` takes it; PATTERN is a regular expression."""
    if not isinstance(value, str) or "=" not in value:
        raise ValueError(f"{value!r}: write PATTERN=TYPE, as llama-quantize --tensor-type takes it (attn_v=Q8_0)")
    pattern, kind = value.rsplit("=", 1)
    if not pattern:
        raise ValueError(f"{value!r}: the pattern before '=' is empty")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{value!r}: {pattern!r} is not a regular expression ({exc})") from None
    return f"{pattern}={_tensor_type(kind)}"


TensorType = Annotated[str, BeforeValidator(_tensor_type)]
TensorOverride = Annotated[str, BeforeValidator(_tensor_override)]


class GgufVariant(BaseModel):
    """One GGUF file: a llama.cpp file type, optionally with llama-quantize's per-tensor overrides.

    Written in a matrix as the bare type (``Q4_K_M``) or as a mapping::

        {name: Q4_K_L, type: Q4_K_M, token_embedding_type: Q8_0, output_tensor_type: Q8_0}
        {name: Q4_K_M-attnv8, type: Q4_K_M, tensor_types: ["attn_v=Q8_0"]}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FileType
    name: str | None = None
    token_embedding_type: TensorType | None = None
    output_tensor_type: TensorType | None = None
    tensor_types: list[TensorOverride] = []

    @model_validator(mode="before")
    @classmethod
    def _bare_type(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _named_when_overridden(self) -> GgufVariant:
        if self.name is not None and not _LABEL_RE.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '.', '+' and '-' (it goes into file names)")
        if self.overridden and self.name is None:
            raise ValueError(f"{self.type} with overrides needs its own name (bartowski calls {self.type} with "
                             f"Q8_0 embeddings and output {self.type[:4]}L); two files cannot share {self.type}")
        if self.overridden and self.name in FILE_TYPES:
            raise ValueError(f"name {self.name} is llama.cpp's own type; a variant with overrides needs another name")
        return self

    @model_serializer(mode="wrap")
    def _bare_when_plain(self, handler: SerializerFunctionWrapHandler) -> Any:
        if not self.overridden and self.name in (None, self.type):
            return self.type
        return {k: v for k, v in handler(self).items() if v not in (None, [])}

    @property
    def overridden(self) -> bool:
        return bool(self.token_embedding_type or self.output_tensor_type or self.tensor_types)

    @property
    def label(self) -> str:
        """What names the file and the variant: ``Q4_K_L``, or the type itself."""
        return self.name or self.type

    def overrides(self) -> list[tuple[str, str]]:
        """``(pattern, tensor type)`` pairs, in the matrix's order (llama.cpp uses the first match)."""
        return [tuple(t.rsplit("=", 1)) for t in self.tensor_types]  # type: ignore[misc]

    CALIBRATED_BY: ClassVar[str] = " imatrix"  # how a plan says this variant uses the calibration windows

    def takes_imatrix(self) -> bool:
        """Whether an importance matrix changes this file (16-bit files are not quantized)."""
        return self.type not in SIXTEEN_BIT

    def calibrated(self) -> bool:
        return self.takes_imatrix()

    def needs_imatrix(self) -> bool:
        forced = {self.token_embedding_type, self.output_tensor_type, *(k for _, k in self.overrides())}
        return self.type in FILE_NEEDS_IMATRIX or bool(forced & TENSOR_NEEDS_IMATRIX - {None})

    def describe(self) -> str:
        """``Q4_K_M, token embeddings Q8_0, output Q8_0, attn_v=Q8_0``"""
        parts = [self.type]
        if self.token_embedding_type:
            parts.append(f"token embeddings {self.token_embedding_type}")
        if self.output_tensor_type:
            parts.append(f"output {self.output_tensor_type}")
        parts += self.tensor_types
        return ", ".join(parts)


class GgufParameters(BaseModel):
    """A GGUF variant's manifest ``parameters``: its file label (``name``: Q4_K_L), llama.cpp's file type
    (``type``: Q4_K_M), the tensor-type overrides and whether an importance matrix was used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: str
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    tensor_types: list[str] = []
    imatrix: bool = False
