"""The variants a matrix asks for: a validated ``Matrix`` expanded into ``VariantSpec``s, in publication
order (GPTQ with its main branch first, AWQ, GGUF, compressed-tensors, MLX), with the checks that need
more than one entry (two variants on one branch or repo, ``gptq.main`` matching exactly one), and the
matrices that ship with quantpub.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from quantpub import naming
from quantpub.errors import MatrixError
from quantpub.gguf_types import GgufVariant
from quantpub.matrix import AwqTarget, CalibrationSpec, GptqSection, GptqVariant, Matrix, Method, read_matrix
from quantpub.matrix_formats import CtScheme, MlxTarget


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
    matrix, lines = read_matrix(path)
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
