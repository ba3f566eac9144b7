"""The model-session builder (stage ``quantize-gpu``): the model loaded once, every GPTQ and AWQ variant of
the plan built on it, each validated and probed in the runtimes users load it with, moved into place whole.

GPTQ in ``gptq.mode: exact`` and AWQ build one variant at a time (``build_variant``, GPTQModel's
looper); ``gptq.mode: shared`` builds every GPTQ variant of one calibration in one pass
(``backends/gptq_shared.py``). Each saved variant goes through ``finish_variant``: conformed to
the source (config, tokenizer, AutoGPTQ's tensors), loaded back in an isolated worker process
(``isolate``: a crash in a kernel costs that variant), its manifest written, renamed into place.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from quantpub import calibration, isolate, progress
from quantpub.backends import backend
from quantpub.built import Outcome, building, move_into_place, partial_dir, write_manifest
from quantpub.errors import QuantizeError
from quantpub.moe import expert_coverage
from quantpub.plan import Job, Plan

log = logging.getLogger(__name__)
OFFLOAD = ".offload"  # a streamed load's quantized layers, under the output dir (deleted after each variant)
VALIDATION_LIBRARIES = ("gptqmodel", "optimum.gptq", "transformers")  # what loading a GPTQ/AWQ variant imports


def build(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, *, model: str, device: str,
          calibration_file: str | Path | None, stream: bool = False) -> list[Outcome]:
    """Build ``jobs`` (GPTQ and AWQ variants of ``plan`` not built yet) from the checkpoint ``model_dir``.

    ``stream``: GPTQModel reads the model layer by layer from the checkpoint instead of loading it
    (models larger than host memory; the shared GPTQ mode needs the whole model, so its variants
    are built in exact mode). Each built variant is loaded back (validation, runtime probes) in a
    process of its own, which imports its libraries while the model loads and calibrates.
    """
    from quantpub.build_each import build_jobs, convertible

    on_session = [j for j in jobs if backend(j.method).module is None]
    each = [j for j in jobs if j not in on_session]  # compressed-tensors: after the GPTQ branches it may convert
    outcomes: list[Outcome] = []
    with isolate.Isolated(out / "logs" / "quantize-gpu", 1, preload=VALIDATION_LIBRARIES) as pool:
        if on_session:
            outcomes += _build_all(plan, on_session, model_dir, out, model, device, calibration_file, stream, pool)
        if each:
            from_built = {j.id: found for j in each if (found := convertible(plan, j, out)) is not None}
            outcomes += build_jobs(plan, each, model_dir, out, pool, model=model, device=device,
                                   calibration_file=calibration_file, from_built=from_built)
    return outcomes


def _build_all(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, model: str, device: str,
               calibration_file, stream: bool, pool: isolate.Isolated) -> list[Outcome]:
    """The GPTQ and AWQ variants: one model session, the shared GPTQ pass or one build per variant."""
    import torch

    from quantpub.backends.gptqmodel_session import ModelSession

    session = ModelSession(model_dir, device, torch.float32 if device == "cpu" else torch.float16, stream=stream,
                           scratch=out / OFFLOAD)
    calibrations = calibration.sets_for(plan, jobs, session.tokenizer, calibration_file)  # before the model loads
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
            path = build_variant(session, job, calibrations[calibration.key(job)], out, model, pool,
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
        groups.setdefault(calibration.key(job), []).append(job)
    outcomes = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantpub-gptq") as executor:
        for key, group in groups.items():
            calib = calibrations[key]
            log.info("GPTQ shared pass: %d variants (%s) from one calibration of %d x %d tokens", len(group),
                     ", ".join(j.id for j in group), calib.n_samples, calib.seq_len)
            by_id = {j.id: j for j in group}
            targets = [Target(j.id, j.variant.params, partial_dir(out, j.id)) for j in group]
            started = time.monotonic()

            def finish(t: Target, calib=calib, started=started, n=len(group), by_id=by_id) -> Path:
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


def build_variant(session, job: Job, calib: calibration.CalibrationSet, out: Path, model: str,
                  pool: isolate.Isolated, *, expert_min_tokens: int) -> Path:
    """One variant on its own (AWQ, or GPTQ in exact mode): quantize, then ``finish_variant``."""
    from quantpub.backends import awq, gptq
    from quantpub.memory import trim_heap

    partial = partial_dir(out, job.id)
    started = time.monotonic()
    try:
        backend = gptq if job.method == "gptq" else awq
        layers = progress.watch_decoder_layers(job.id)
        try:
            isolate.maybe_crash("quantize", job.id)  # the calibration pass runs here, in the stage's own process
            quant_log = backend.build(session, job.variant.params, calib, partial)
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
    from quantpub.validate import validate_transformers

    final = out / job.id
    started = time.monotonic()
    with building(partial, job.id, model):
        experts = expert_coverage(quant_log, min_tokens=expert_min_tokens)
        if experts and experts["starved"]:
            log.warning("%s: %d experts got fewer than %d calibration tokens: %s", job.id, len(experts["starved"]),
                        experts["min_tokens"], ", ".join(experts["starved"]))
        (partial / "quant_log.csv").unlink(missing_ok=True)
        conform_to_source(partial, session.model_dir)  # the source's config/tokenizer files, AutoGPTQ's tensors
        progress.report(job.id, "validating")
        prompt = list(calib.samples[0])
        validation = pool.call(job.id, "validate", validate_transformers, partial, job.method, job.variant.params,
                               session.device, prompt)
        compat = pool.call(job.id, "compat", check_variant, partial, job.method, prompt)  # the manifest records these
        write_manifest(partial, job, calib, model, session.device, round(quantized_s, 2), validation, experts=experts,
                       streamed=session.stream, compat=compat, **(extra or {}))
        move_into_place(partial, final)
    log.info("%s: quantized in %.1fs, validated in %.1fs -> %s", job.id, quantized_s, time.monotonic() - started, final)
    return final
