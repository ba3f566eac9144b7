"""The per-variant builder: formats made one variant at a time from the checkpoint by their own library
(compressed-tensors, MLX), each loaded back in its runtime, probed in the others, moved into place whole.

Stage ``quantize-cpu`` builds MLX this way; the model-session stage builds compressed-tensors this
way after its GPTQ variants, so a W4A16 or W8A8 whose GPTQ solve equals a GPTQ branch just built
from the same calibration is converted from that branch instead of solved again (``from_built``).
Loading back and probing run in an isolated worker process (a crash costs that variant).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from quantpub import calibration, isolate, progress
from quantpub.artifacts import MANIFEST
from quantpub.backends import backend
from quantpub.built import Outcome, building, move_into_place, partial_dir, write_manifest
from quantpub.plan import Job, Plan

log = logging.getLogger(__name__)
PROMPT_TOKENS = 16


def build(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, *, model: str, device: str,
          calibration_file: str | Path | None, stream: bool = False) -> list[Outcome]:
    """Build ``jobs`` (formats with their own builder module) from the checkpoint ``model_dir``."""
    with isolate.Isolated(out / "logs" / "quantize-cpu", 1) as pool:
        return build_jobs(plan, jobs, model_dir, out, pool, model=model, device=device,
                          calibration_file=calibration_file)


def build_jobs(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, pool: isolate.Isolated, *, model: str,
               device: str, calibration_file: str | Path | None,
               from_built: dict[str, Path] | None = None) -> list[Outcome]:
    """Each of ``jobs`` in turn; ``from_built``: job id -> a built directory its builder may convert from."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibrated = [j for j in jobs if j.variant.calibration is not None]
    sets = calibration.sets_for(plan, calibrated, tokenizer, calibration_file) if calibrated else {}
    text, _, _ = plan.text("calibration", plan.matrix.calibration, calibration_file)
    prompt = tokenizer(text[:4000], add_special_tokens=True).input_ids[:PROMPT_TOKENS]  # what validation runs
    outcomes = []
    for job in jobs:
        progress.report(job.id, "quantizing")
        calib = sets.get(calibration.key(job)) if job.variant.calibration is not None else None
        try:
            path = build_one(job, model_dir, out, pool, model=model, device=device, calib=calib,
                             prompt=list(calib.samples[0]) if calib else prompt,
                             from_built=(from_built or {}).get(job.id))
            outcomes.append(Outcome(job.id, path))
        except isolate.Ended as exc:
            outcomes.append(Outcome.ended(job.id, exc))
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the others
            log.error("%s: failed: %s: %s", job.id, type(exc).__name__, exc)
            outcomes.append(Outcome(job.id, None, error=f"{type(exc).__name__}: {exc}"))
        o = outcomes[-1]
        progress.report(job.id, o.phase, **({"error": o.error} if o.error else {}))
    return outcomes


def build_one(job: Job, model_dir: Path, out: Path, pool: isolate.Isolated, *, model: str, device: str,
              calib, prompt: list[int], from_built: Path | None) -> Path:
    """Build, load back, probe, record and move one variant into ``OUT/<id>``."""
    from quantpub.compat import check_variant

    b = backend(job.method)
    module = b.builder()
    partial = partial_dir(out, job.id)
    started = time.monotonic()
    with building(partial, job.id, model):
        isolate.maybe_crash("quantize", job.id)
        extra = {"from_gptq": from_built} if from_built is not None else {}
        record = module.build(model_dir, partial, job.variant.params, calib, device, **extra)
        seconds = time.monotonic() - started
        progress.report(job.id, "validating")
        validation = pool.call(job.id, "validate", module.validate, partial, job.variant.params, prompt)
        compat = pool.call(job.id, "compat", check_variant, partial, job.method, prompt)
        write_manifest(partial, job, calib, model, device, round(seconds, 2), validation, compat=compat, build=record)
        move_into_place(partial, out / job.id)
    log.info("%s: built in %.1fs (%s), validated -> %s", job.id, seconds, record.get("route", b.kind), out / job.id)
    return out / job.id


def convertible(plan: Plan, job: Job, out: Path) -> Path | None:
    """A built GPTQ branch of ``plan`` whose solve is the one ``job`` (compressed-tensors W4A16/W8A8) needs, with the
    same calibration windows: its directory, to convert instead of solving again; None otherwise."""
    from quantpub.backends.ct_variant import gptq_variant

    wanted = gptq_variant(job.variant.params)
    if wanted is None or job.variant.calibration is None:
        return None
    for other in plan.jobs:
        if other.method != "gptq" or calibration.key(other) != calibration.key(job):
            continue
        params = other.variant.params
        same = wanted.model_dump(exclude={"branch", "dataset", "seq_len"}) == \
            params.model_dump(exclude={"branch", "dataset", "seq_len"})
        if same and (out / other.id / MANIFEST).is_file():
            return out / other.id
    return None
