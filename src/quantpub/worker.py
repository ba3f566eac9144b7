"""The worker: load a model once, quantize every GPTQ/AWQ job of a plan, validate, write atomically.

Each variant lands in ``OUT/<variant id>/``. It is built in ``OUT/.partial-<id>-<pid>/`` and
renamed into place only after it was saved, validated and its ``quantpub.json`` manifest
written, so a killed run never leaves a directory under the final name; a re-run skips
variants whose directory exists and rebuilds the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quantpub import __version__, calibration, isolate, progress
from quantpub.artifacts import MANIFEST, RUN_RECORD, recall, remember, sha256_file, write_text_atomic
from quantpub.moe import expert_coverage
from quantpub.errors import PlanError, QuantizeError, QuantpubError
from quantpub.plan import Job, Plan, make_plan
from quantpub.quants import GgufVariant

log = logging.getLogger(__name__)
WORKER_METHODS = ("gptq", "awq", "gguf")
OFFLOAD = ".offload"
SAME_BUILD = ("variant", "method", "branch", "repo", "parameters", "model")  # a record must agree on these too
VALIDATION_LIBRARIES = ("gptqmodel", "optimum.gptq", "transformers")  # what loading a GPTQ/AWQ variant imports  # a streamed load's quantized layers, under the output dir (deleted after each variant)


@dataclass(frozen=True)
class Outcome:
    """How building one variant ended: built (``path``), skipped (already built), or ``error`` with its
    ``ending``: ``failed`` (an exception), ``crashed`` (native code killed its process) or
    ``interrupted`` (its process was killed from outside)."""

    variant: str
    path: Path | None
    skipped: bool = False
    error: str | None = None
    ending: str = "failed"

    @classmethod
    def ended(cls, variant: str, exc: isolate.Ended) -> Outcome:
        return cls(variant, None, error=str(exc), ending=exc.kind)

    @property
    def phase(self) -> str:
        """The progress phase this outcome reports: done, or how it ended."""
        return "done" if self.error is None else self.ending


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gguf_device(device: str) -> str:
    """Where the GGUF group's importance matrix runs: ``device``, or the CPU when no GPU is visible here.

    A run gives the GGUF group CPU cores and no GPU slot (its worker sees ``CUDA_VISIBLE_DEVICES=""``)
    while ``--device cuda`` names the device of the GPU stages.
    """
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "cpu"
    return device


def select_jobs(plan: Plan, only: list[str] | None) -> list[Job]:
    jobs = [j for j in plan.jobs if j.method in WORKER_METHODS]
    if only:
        known = {j.id for j in jobs}
        unknown = [v for v in only if v not in known]
        if unknown:
            raise QuantpubError(f"--only {', '.join(unknown)}: no such variant in {plan.matrix_path}; "
                                f"choose from {', '.join(sorted(known))}")
        jobs = [j for j in jobs if j.id in only]
    return jobs


def quantize(matrix_path: str | Path, model: str, out: str | Path, *, only: list[str] | None = None,
             calibration_file: str | Path | None = None, device: str = "auto",
             n_samples: int | None = None, seq_len: int | None = None,
             source: str | Path | None = None, stream: bool = False) -> list[Outcome]:
    """Build every GPTQ/AWQ variant of the matrix that is not built yet.

    ``n_samples`` / ``seq_len`` override the matrix's calibration size for every variant
    (smoke runs on CPU); the manifest records what was used. One variant's failure does not
    stop the others; it is reported in its ``Outcome``. ``source`` is the checkpoint directory
    when ``model`` (a hub id) was already downloaded. ``stream``: GPTQ and AWQ read the model
    layer by layer from the checkpoint instead of loading it (for models larger than host
    memory; the shared GPTQ mode needs the whole model, so its variants are built in exact mode).

    Raises:
        MatrixError, ModelError, PlanError, CalibrationError: before any model is loaded.
    """
    from quantpub.memory import release_large_blocks_on_free

    release_large_blocks_on_free()  # freed layers and models go back to the system, not to the heap
    device = resolve_device(device)
    plan = make_plan(matrix_path, model, device="cpu" if device == "cpu" else "cuda")
    if plan.problems:
        raise PlanError(model, list(plan.problems))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [replace(j, n_samples=n_samples or j.n_samples, seq_len=seq_len or j.seq_len)
            for j in select_jobs(plan, only)]
    _write_run_record(out, plan, model)
    todo = [j for j in jobs if not (out / j.id / MANIFEST).is_file()]
    outcomes = [Outcome(j.id, out / j.id, skipped=True) for j in jobs if j not in todo]
    for o in outcomes:
        log.info("%s: already built in %s, skipped", o.variant, o.path)
    if not todo:
        return outcomes

    model_dir = Path(source) if source is not None else _local_model(model)
    gpu_jobs = [j for j in todo if j.method in ("gptq", "awq")]
    gguf_jobs = [j for j in todo if j.method == "gguf"]
    if gpu_jobs:
        # each built variant is loaded back (validation, runtime probes) in a process of its own: a crash in a
        # kernel costs that variant; the process imports its libraries while the model loads and calibrates
        with isolate.Isolated(out / "logs" / "quantize-gpu", 1, preload=VALIDATION_LIBRARIES) as pool:
            outcomes += _build_gpu_group(plan, gpu_jobs, model_dir, out, model, device, calibration_file, stream, pool)
    if gguf_jobs:
        outcomes += _gguf(plan, gguf_jobs, model_dir, out, model, calibration_file, gguf_device(device))
    order = {j.id: i for i, j in enumerate(jobs)}
    return sorted(outcomes, key=lambda o: order[o.variant])


def _build_gpu_group(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, model: str, device: str,
                     calibration_file, stream: bool, pool: isolate.Isolated) -> list[Outcome]:
    """The GPTQ and AWQ variants: one model session, the shared GPTQ pass or one build per variant."""
    import torch

    from quantpub.backends.gptqmodel_session import ModelSession

    session = ModelSession(model_dir, device, torch.float32 if device == "cpu" else torch.float16, stream=stream,
                           scratch=out / OFFLOAD)
    calibrations = _calibrations(jobs, session.tokenizer, calibration_file)  # before the model loads
    mode = plan.matrix.gptq.mode if plan.matrix.gptq else "exact"
    if stream and mode == "shared":
        log.warning("gptq.mode: shared holds the whole model in memory; streamed layer by layer, the GPTQ "
                    "variants are built in exact mode")
        mode = "exact"
    outcomes: list[Outcome] = []
    shared = [j for j in jobs if j.method == "gptq" and mode == "shared"]
    if shared:
        outcomes += _build_shared(session, shared, calibrations, out, model, pool,
                                  expert_min_tokens=plan.facts.hidden_size)
    one_by_one = [j for j in jobs if j not in shared]
    for i, job in enumerate(one_by_one, 1):
        log.info("[%d/%d] %s: quantizing (%s)", i, len(one_by_one), job.id, job.describe())
        progress.report(job.id, "quantizing")
        try:
            path = build_variant(session, job, calibrations[_calib_key(job)], out, model, pool,
                                 expert_min_tokens=plan.facts.hidden_size)
            outcomes.append(Outcome(job.id, path))
            progress.report(job.id, "done")
        except isolate.Ended as exc:
            outcomes.append(Outcome.ended(job.id, exc))
            progress.report(job.id, exc.kind, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the others
            log.error("%s: failed: %s: %s", job.id, type(exc).__name__, exc)
            outcomes.append(Outcome(job.id, None, error=f"{type(exc).__name__}: {exc}"))
            progress.report(job.id, "failed", error=f"{type(exc).__name__}: {exc}")
    del session
    shutil.rmtree(out / OFFLOAD, ignore_errors=True)  # a failed streamed variant's offloaded layers
    return outcomes


def _build_shared(session, jobs: list[Job], calibrations: dict, out: Path, model: str, pool: isolate.Isolated, *,
                  expert_min_tokens: int) -> list[Outcome]:
    """The GPTQ variants in shared mode: one pass per distinct calibration, each variant finished as it is written."""
    from concurrent.futures import ThreadPoolExecutor

    from quantpub.backends.gptq_shared import Target, quantize_shared

    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(_calib_key(job), []).append(job)
    outcomes = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantpub-gptq") as executor:
        for key, group in groups.items():
            calib = calibrations[key]
            log.info("GPTQ shared pass: %d variants (%s) from one calibration of %d x %d tokens", len(group),
                     ", ".join(j.id for j in group), calib.n_samples, calib.seq_len)
            by_id = {j.id: j for j in group}
            targets = [Target(j.id, j.variant.params, _partial_dir(out, j.id)) for j in group]
            started = time.monotonic()

            def finish(t: Target, calib=calib, started=started, n=len(group)) -> Path:
                return finish_variant(session, by_id[t.id], calib, t.out, out, model, time.monotonic() - started,
                                      t.quant_log, pool, expert_min_tokens=expert_min_tokens,
                                      extra={"gptq_mode": "shared", "variants_in_pass": n})
            for t in targets:
                progress.report(t.id, "quantizing")
            try:
                futures = quantize_shared(session, targets, calib, executor, finish)
            except Exception as exc:  # noqa: BLE001 - the pass failed: every variant of it fails, others stand
                log.error("GPTQ shared pass failed: %s: %s", type(exc).__name__, exc)
                futures = None
                error = f"{type(exc).__name__}: {exc}"
            for t in targets:
                try:
                    if futures is None:
                        raise QuantizeError(t.id, model, error)
                    outcomes.append(Outcome(t.id, futures[t.id].result()))
                    progress.report(t.id, "done")
                except isolate.Ended as exc:
                    shutil.rmtree(t.out, ignore_errors=True)
                    outcomes.append(Outcome.ended(t.id, exc))
                    progress.report(t.id, exc.kind, error=str(exc))
                except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the others
                    shutil.rmtree(t.out, ignore_errors=True)
                    if t.error is None:  # a solve or packing error was logged when it happened
                        log.error("%s: failed: %s: %s", t.id, type(exc).__name__, exc)
                    outcomes.append(Outcome(t.id, None, error=t.error or f"{type(exc).__name__}: {exc}"))
                    progress.report(t.id, "failed", error=outcomes[-1].error)
    return outcomes


def _gguf(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, model: str, calibration_file, device: str):
    from transformers import AutoTokenizer

    from quantpub.gguf_worker import build_gguf_set

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = jobs[0].variant.calibration or plan.matrix.calibration
    text, source = calibration.load_text(spec, calibration_file)  # imatrix samples and validation text
    calib = None
    if jobs[0].variant.calibration is not None:
        calib = calibration.build(text, source, tokenizer, n_samples=jobs[0].n_samples, seq_len=jobs[0].seq_len,
                                  seed=spec.seed, origin=calibration.origin(spec, calibration_file))
    held_out = text[len(text) // 2:]  # validation reads the second half; imatrix windows may come from anywhere
    try:
        return build_gguf_set(plan, jobs, model_dir, out, model, tokenizer=tokenizer, text=held_out,
                              text_source=f"{source} (second half)", calib=calib, device=device,
                              write_manifest=_write_manifest, log_dir=out / "logs" / "quantize-gguf")
    except Exception as exc:  # noqa: BLE001 - conversion or imatrix failed: every GGUF variant fails, others stand
        log.error("GGUF: %s: %s", type(exc).__name__, exc)
        return [Outcome(j.id, None, error=f"{type(exc).__name__}: {exc}") for j in jobs]


def _local_model(model: str) -> Path:
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    # tokenizer and chat-template files too: conform_to_source ships exactly what the source has
    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                         "*.tiktoken"]))


def _calib_key(job: Job) -> tuple:
    spec = job.variant.calibration
    return (spec.dataset, spec.config, spec.split, spec.text_column, spec.seed, job.seq_len, job.n_samples)


def _calibrations(jobs: list[Job], tokenizer, file) -> dict[tuple, calibration.CalibrationSet]:
    """One CalibrationSet per distinct calibration; each source text is loaded once."""
    texts: dict[tuple, tuple[str, str]] = {}
    sets = {}
    for job in jobs:
        key = _calib_key(job)
        if key in sets:
            continue
        spec = job.variant.calibration
        text_key = key[:4]
        if text_key not in texts:
            texts[text_key] = calibration.load_text(spec, file)
        text, source = texts[text_key]
        sets[key] = calibration.build(text, source, tokenizer, n_samples=job.n_samples, seq_len=job.seq_len,
                                      seed=spec.seed, origin=calibration.origin(spec, file))
    return sets


def _partial_dir(out: Path, variant: str) -> Path:
    partial = out / f".partial-{variant}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def build_variant(session, job: Job, calib: calibration.CalibrationSet, out: Path, model: str,
                  pool: isolate.Isolated, *, expert_min_tokens: int) -> Path:
    """One variant on its own (AWQ, or GPTQ in exact mode): quantize, then ``finish_variant``."""
    from quantpub.backends import awq, gptq
    from quantpub.memory import trim_heap

    partial = _partial_dir(out, job.id)
    started = time.monotonic()
    try:
        backend = gptq if job.method == "gptq" else awq
        layers = progress.watch_decoder_layers(job.id)
        try:
            isolate.maybe_crash("quantize", job.id)  # the calibration pass runs here, in the stage's own process
            quant_log = backend.quantize(session, job.variant.params, calib, partial)
        finally:
            layers.remove()
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise QuantizeError(job.id, model, f"{type(exc).__name__}: {exc}") from exc
    trim_heap()  # the quantized model is gone: what validation loads should not sit on top of it
    extra = {"gptq_mode": "exact"} if job.method == "gptq" else None
    return finish_variant(session, job, calib, partial, out, model, time.monotonic() - started, quant_log, pool,
                          expert_min_tokens=expert_min_tokens, extra=extra)


def finish_variant(session, job: Job, calib: calibration.CalibrationSet, partial: Path, out: Path, model: str,
                   quantized_s: float, quant_log: Any, pool: isolate.Isolated, *, expert_min_tokens: int,
                   extra: dict[str, Any] | None = None) -> Path:
    """Validate the variant saved in ``partial`` (loaded in ``pool``'s process), write its manifest and move
    it to ``out/<id>``.

    Raises:
        QuantizeError: validation failed; ``partial`` is removed.
        isolate.Ended: the process that loaded it crashed or was killed; ``partial`` is removed.
    """
    from quantpub.backends.conform import conform_to_source
    from quantpub.compat import check_variant
    from quantpub.validate import validate

    final = out / job.id
    started = time.monotonic()
    try:
        experts = expert_coverage(quant_log, min_tokens=expert_min_tokens)
        if experts and experts["starved"]:
            log.warning("%s: %d experts got fewer than %d calibration tokens: %s", job.id, len(experts["starved"]),
                        experts["min_tokens"], ", ".join(experts["starved"]))
        (partial / "quant_log.csv").unlink(missing_ok=True)
        conform_to_source(partial, session.model_dir)  # the source's config/tokenizer files, AutoGPTQ's tensors
        progress.report(job.id, "validating")
        prompt = list(calib.samples[0])
        validation = pool.call(job.id, "validate", validate, partial, job.variant.params, session.device, prompt)
        compat = pool.call(job.id, "compat", check_variant, partial, job.method, prompt)  # the manifest records these
        _write_manifest(partial, job, calib, model, session.device, quantized_s, validation, experts,
                        {**(extra or {}), "streamed": session.stream, "compat": compat})
        if final.exists():  # a directory without our manifest (finished ones were skipped): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
    except isolate.Ended:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise QuantizeError(job.id, model, f"{type(exc).__name__}: {exc}") from exc
    log.info("%s: quantized in %.1fs, validated in %.1fs -> %s", job.id, quantized_s, time.monotonic() - started, final)
    return final


def _write_manifest(path: Path, job: Job, calib, model: str, device: str, seconds: float,
                    validation: dict[str, Any], experts: dict[str, Any] | None,
                    extra: dict[str, Any] | None = None) -> None:
    import torch
    import transformers

    files = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(p for p in path.iterdir() if p.is_file())}
    manifest = {
        "variant": job.id, "method": job.method, "branch": job.variant.branch, "repo": job.repo,
        "parameters": _parameters(job), "model": model,
        "calibration": calib.record() if calib is not None else None, "device": device, "quantize_seconds": round(seconds, 2),
        "validation": validation, "experts": experts, "files": files, "size": sum(f["size"] for f in files.values()),
        "tools": {"quantpub": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        **(extra or {}),
    }
    if job.method == "gguf":
        from quantpub.backends import llamacpp

        manifest["tools"]["llama-cpp-python"] = llamacpp.version()
        manifest["tools"]["llama.cpp"] = llamacpp.commit()
    else:
        import gptqmodel
        import optimum.version

        manifest["tools"]["gptqmodel"] = gptqmodel.__version__
        manifest["tools"]["optimum"] = optimum.version.__version__
    recorded = recall(path.parent, job.id, files)
    if recorded is not None and {k: recorded.get(k) for k in SAME_BUILD} == {k: manifest[k] for k in SAME_BUILD}:
        log.info("%s: rebuilt byte for byte; keeping what was recorded for these files", job.id)
        manifest = recorded
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    remember(path.parent, manifest)


def _write_run_record(out: Path, plan: Plan, model: str) -> None:
    """What the card stage needs beyond the manifests: the source model and the matrix's card settings."""
    record = {"model": model, "matrix": str(plan.matrix_path), "card": plan.matrix.card.model_dump(mode="json"),
              "repos": plan.repos, "variants": [j.id for j in plan.jobs], "quantpub": __version__}
    write_text_atomic(out / RUN_RECORD, json.dumps(record, indent=2) + "\n")


def _parameters(job: Job) -> dict[str, Any]:
    p = job.variant.params
    if isinstance(p, GgufVariant):  # name: the file's label (Q4_K_L); type: llama.cpp's file type (Q4_K_M)
        overrides = {k: v for k, v in (("token_embedding_type", p.token_embedding_type),
                                       ("output_tensor_type", p.output_tensor_type),
                                       ("tensor_types", p.tensor_types)) if v}
        return {"name": p.label, "type": p.type, **overrides,
                "imatrix": job.variant.calibration is not None and p.takes_imatrix()}
    return p.model_dump(mode="json")
