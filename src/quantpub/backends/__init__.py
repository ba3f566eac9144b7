"""The one backend table: every format quantpub builds, and what the rest of quantpub asks of it.

A format is one ``Backend`` entry here plus the modules it names; its variants come from the
matrix section of the same name (``variants.expand``). Everything else dispatches through this
table, never on the format's name:

* the driver makes one quantize task per ``stage`` a model's variants need, and the stage's
  builder builds them (``quantize-gpu``: ``build_session``, one model session for every variant
  that needs the model loaded; ``quantize-gguf``: ``build_gguf``, one conversion for every type);
* ``estimate`` sizes each variant with ``size``; the manifest records ``tools`` and
  ``parameters``;
* evaluation loads a variant in its ``runtime`` (``evaluate.measure``);
* the card stage renders ``card_template`` with ``library_name``; publish gives each variant its
  own branch, or (``files_on_main``) puts its files beside the other variants' on the repo's main.

Adding a format: README "Adding a format".
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module, metadata
from typing import Any, Callable

DECODERS = frozenset({"llama", "mistral", "mixtral"})  # config.json model_type values tested end to end


@dataclass(frozen=True)
class Stage:
    """A quantize stage: one task per model, one builder for all its variants of the stage's formats."""

    name: str
    builder: str    # the module whose ``build(...)`` builds the stage's variants
    gpu: bool       # takes a GPU slot (a CPU slot on a machine without one)
    memory: str     # the ``estimate`` function giving its peak host bytes (plan, jobs, device, stream)

    def host_memory(self, plan, jobs, device: str, stream: bool = False) -> int:
        from quantpub import estimate

        return getattr(estimate, self.memory)(plan, jobs, device, stream)

    def build(self):
        return import_module(self.builder)

    def streaming(self, plan, jobs, device: str, mode: str, machine: int | None) -> tuple[int, bool]:
        """(host bytes to reserve, whether to stream the model layer by layer) for ``--stream`` ``mode``:
        ``auto`` streams when the whole-model estimate exceeds ``machine`` (the largest machine's memory) and the
        streamed one does not; ``always`` / ``never`` decide. Only a model-session stage can stream."""
        whole = self.host_memory(plan, jobs, device)
        if not self.gpu:
            return whole, False
        streamed = self.host_memory(plan, jobs, device, stream=True)
        stream = mode == "always" or (mode == "auto" and machine is not None and whole > machine >= streamed)
        return (streamed if stream else whole), stream


STAGES = {s.name: s for s in (
    Stage("quantize-gpu", "quantpub.build_session", True, "session_group_memory"),
    Stage("quantize-gguf", "quantpub.build_gguf", False, "gguf_group_memory"),
    Stage("quantize-cpu", "quantpub.build_each", False, "session_group_memory"),
)}


@dataclass(frozen=True)
class Backend:
    method: str                 # the matrix section and the manifest's ``method``
    kind: str                   # how cards and tables name the format
    stage: str                  # the quantize stage that builds it (a key of STAGES)
    card_template: str          # under card/templates/
    library_name: str           # the card's front matter
    runtime: str                # what evaluation loads a variant with: transformers, llama.cpp
    files_on_main: bool         # variants share the repo's main (GGUF) instead of a branch each
    tool_packages: tuple[str, ...]  # library versions recorded in every manifest of the format
    parameters: Callable[[Any], dict[str, Any]]  # a plan Job -> the manifest's parameters
    size: Callable[[Any, Any], int]  # (ModelFacts, the variant's parameters) -> estimated bytes on disk
    params_type: str = ""       # "module:Class" of the typed parameters the manifest's ``parameters`` hold
    loader: str | None = None   # "module:function" giving from_pretrained's extra arguments (transformers runtime)
    card_rows: str = ""         # "module:function": (manifests, source, hub, repo, quality) -> the card table's rows
    card_tags: str = "quantpub.card.formats:tags"  # (manifests) -> the card's front-matter tags
    card_tested: str | None = None  # (manifests) -> a "Tested to load in" section, for formats without one in the template
    module: str | None = None   # a format built one variant at a time from the checkpoint (``build_each``): the module
    #                             with build, validate, logprobs, estimated_size, manifest_parameters
    repo: str | None = None     # "module:function" (matrix, spec, model name) -> its repo id; default: repos.<method>
    model_types: frozenset[str] = DECODERS
    solves_hessians: bool = False  # GPTQ-style solve: its memory holds each linear's Hessian

    def read_parameters(self, parameters: dict[str, Any]):
        """A manifest's ``parameters``, typed (``params_type``)."""
        return _resolve(self.params_type).model_validate(parameters)

    def card_function(self, what: str) -> Callable:
        """The card stage's ``rows``, ``tags`` or ``tested`` function for this format."""
        return _resolve(getattr(self, f"card_{what}"))

    def loader_kwargs(self, model_dir, params, device: str) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments that load a variant (typed ``params``) on ``device``."""
        return _resolve(self.loader)(model_dir, params, device) if self.loader else {}

    def tools(self) -> dict[str, str]:
        """The versions of the libraries that built and checked a variant of this format."""
        from quantpub import __version__

        found = {"quantpub": __version__}
        for name in ("transformers", "torch", *self.tool_packages):
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        if "llama-cpp-python" in self.tool_packages:
            from quantpub.backends import llamacpp

            found["llama.cpp"] = llamacpp.commit()
        return found

    def plan_memory(self, facts, job_spec, *, n_samples: int | None, seq_len: int | None,
                    device: str) -> tuple[int | None, int, int | None]:
        """(accelerator bytes or None, host bytes, host bytes streamed or None) of building one variant."""
        from quantpub import estimate

        if self.stage == "quantize-gguf":
            return None, estimate.gguf_memory(facts), None
        if self.module is not None and job_spec.calibration is None:  # a data-free conversion of the checkpoint
            return None, estimate.convert_memory(facts, device), None
        dev, host, streamed = estimate.session_memory(facts, n_samples=n_samples, seq_len=seq_len, device=device,
                                                      hessians=self.solves_hessians)
        return dev, host, streamed if self.module is None else None

    def repo_id(self, matrix, spec, model_name: str) -> str:
        """The repo a variant of this format is published to."""
        if self.repo:
            return _resolve(self.repo)(matrix, spec, model_name)
        from quantpub import naming

        return naming.repo_id(matrix.repos.namespace, getattr(matrix.repos, self.method), model_name)

    def builder(self):
        """The module that builds one variant of a per-variant format (``module``)."""
        return import_module(self.module)


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)


def _gptq_parameters(job) -> dict[str, Any]:
    return job.variant.params.model_dump(mode="json")


def _gguf_parameters(job) -> dict[str, Any]:
    """name: the file's label (Q4_K_L); type: llama.cpp's file type (Q4_K_M); the tensor overrides; imatrix."""
    p = job.variant.params
    overrides = {k: v for k, v in (("token_embedding_type", p.token_embedding_type),
                                   ("output_tensor_type", p.output_tensor_type),
                                   ("tensor_types", p.tensor_types)) if v}
    return {"name": p.label, "type": p.type, **overrides,
            "imatrix": job.variant.calibration is not None and p.takes_imatrix()}


def _runtime_parameters(module: str) -> Callable[[Any], dict[str, Any]]:
    def parameters(job) -> dict[str, Any]:
        return import_module(f"quantpub.backends.{module}").manifest_parameters(job.variant.params)
    return parameters


def _runtime_size(module: str) -> Callable[[Any, Any], int]:
    def size(facts, params) -> int:
        return import_module(f"quantpub.backends.{module}").estimated_size(facts, params)
    return size


def _size(name: str) -> Callable[[Any, Any], int]:
    def size(facts, params) -> int:
        from quantpub import estimate

        return getattr(estimate, name)(facts, params)
    return size


BACKENDS: dict[str, Backend] = {b.method: b for b in (
    Backend("gptq", "GPTQ", "quantize-gpu", "gptq.md.j2", "transformers", "transformers", False,
            ("gptqmodel", "optimum"), _gptq_parameters, _size("gptq_variant_size"), "quantpub.matrix:GptqVariant",
            "quantpub.validate:gptq_loader_kwargs", "quantpub.card.render:gptq_rows", solves_hessians=True),
    Backend("awq", "AWQ", "quantize-gpu", "awq.md.j2", "transformers", "transformers", False,
            ("gptqmodel", "optimum"), _gptq_parameters, _size("awq_variant_size"), "quantpub.matrix:AwqTarget",
            "quantpub.validate:awq_loader_kwargs", "quantpub.card.render:awq_rows", "quantpub.card.formats:awq_tags"),
    Backend("gguf", "GGUF", "quantize-gguf", "gguf.md.j2", "gguf", "llama.cpp", True,
            ("llama-cpp-python", "gguf"), _gguf_parameters, _size("gguf_size"), "quantpub.gguf_types:GgufParameters",
            card_rows="quantpub.card.render:gguf_rows"),
    # after the GPTQ variants of the same stage: a W4A16/W8A8 solve equal to a built GPTQ branch is converted from it
    Backend("compressed_tensors", "compressed-tensors", "quantize-gpu", "compressed_tensors.md.j2", "vllm",
            "transformers (compressed-tensors)", False, ("compressed-tensors", "gptqmodel"),
            _runtime_parameters("ct_variant"), _runtime_size("ct_variant"), "quantpub.matrix_formats:CtScheme",
            card_rows="quantpub.card.formats:ct_rows", card_tags="quantpub.card.formats:ct_tags",
            card_tested="quantpub.card.formats:tested_in", module="quantpub.backends.ct_variant",
            repo="quantpub.variants:runtime_repo", solves_hessians=True),
    Backend("mlx", "MLX", "quantize-cpu", "mlx.md.j2", "mlx", "mlx-lm", False, ("mlx", "mlx-lm"),
            _runtime_parameters("mlx_variant"), _runtime_size("mlx_variant"), "quantpub.matrix_formats:MlxTarget",
            card_rows="quantpub.card.formats:mlx_rows", card_tags="quantpub.card.formats:mlx_tags",
            card_tested="quantpub.card.formats:tested_in", module="quantpub.backends.mlx_variant",
            repo="quantpub.variants:runtime_repo"),
)}


def backend(method: str) -> Backend:
    """The table's entry for ``method``."""
    try:
        return BACKENDS[method]
    except KeyError:
        raise ValueError(f"no backend {method!r}; known: {', '.join(BACKENDS)}") from None


def stage_methods(stage: str) -> tuple[str, ...]:
    """The formats a quantize stage builds."""
    return tuple(m for m, b in BACKENDS.items() if b.stage == stage)
