"""The quantize stage: a plan's variants, each stage's builder in turn (``backends.STAGES``).

Each variant lands in ``OUT/<variant id>/``, built in a ``.partial-`` directory and moved into
place whole (``built``); a re-run skips variants whose manifest exists and builds the rest. The
builders: ``build_session`` (GPTQ, AWQ: the model loaded once) and ``build_gguf`` (one conversion,
every GGUF type).
"""

from __future__ import annotations

import logging
from pathlib import Path

from quantpub import machine
from quantpub.artifacts import MANIFEST
from quantpub.backends import STAGES, backend
from quantpub.built import Outcome
from quantpub.errors import PlanError, QuantpubError
from quantpub.plan import Job, Plan, make_plan, write_plan
from quantpub.source import local_checkpoint

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """``auto``: cuda when this process sees a GPU, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def select_jobs(plan: Plan, only: list[str] | None) -> list[Job]:
    jobs = list(plan.jobs)
    if only:
        known = {j.id for j in jobs}
        unknown = [v for v in only if v not in known]
        if unknown:
            raise QuantpubError(f"--only {', '.join(unknown)}: no such variant in {plan.matrix_path}; "
                                f"choose from {', '.join(sorted(known))}")
        jobs = [j for j in jobs if j.id in only]
    return jobs


def build_from_matrix(matrix_path: str | Path, model: str, out: str | Path, *, only: list[str] | None = None,
                      calibration_file: str | Path | None = None, device: str = "auto",
                      n_samples: int | None = None, seq_len: int | None = None,
                      source: str | Path | None = None, stream: str | bool = "auto") -> list[Outcome]:
    """Plan ``model`` with the matrix, record the plan in ``out`` (``OUT/plan.json``, the calibration text
    snapshotted), then build every variant not built yet (``build_plan``).

    ``n_samples`` / ``seq_len`` override the matrix's calibration size for every variant (smoke runs on
    CPU); the manifest records what was used. ``source`` is the checkpoint directory when ``model`` (a hub
    id) was already downloaded. ``stream``: GPTQ and AWQ read the model layer by layer from the checkpoint
    instead of loading it (models larger than host memory): ``auto`` when the plan's estimate of the whole model
    does not fit this machine's memory and the streamed one does, ``always``/``never`` (or True/False).

    Raises:
        MatrixError, ModelError, PlanError, CalibrationError: before any model is loaded.
    """
    device = resolve_device(device)
    plan = make_plan(matrix_path, model, device="cpu" if device == "cpu" else "cuda", n_samples=n_samples,
                     seq_len=seq_len)
    if plan.problems:
        raise PlanError(model, list(plan.problems))
    select_jobs(plan, only)  # a mistyped --only is reported before any text is read or written
    plan = write_plan(plan, out, calibration_file=calibration_file, evaluation=False)
    if isinstance(stream, str):
        session = [j for j in select_jobs(plan, only) if STAGES[backend(j.method).stage].gpu]
        mode, stage = stream, next(s for s in STAGES.values() if s.gpu)
        stream = bool(session) and stage.streaming(plan, session, plan.device, mode, machine.total_memory())[1]
    return build_plan(plan, out, only=only, device=device, source=source, stream=stream,
                      calibration_file=calibration_file)


def build_plan(plan: Plan, out: str | Path, *, only: list[str] | None = None, device: str = "auto",
               source: str | Path | None = None, stream: bool = False,
               calibration_file: str | Path | None = None) -> list[Outcome]:
    """Build every variant of ``plan`` (or ``only`` these) that has no manifest in ``out`` yet, each stage's
    builder in turn; one variant's failure does not stop the others (it is in its ``Outcome``).

    ``calibration_file`` is read only when the plan has no snapshot of its text (a plan not written).
    """
    from quantpub.memory import release_large_blocks_on_free

    release_large_blocks_on_free()  # freed layers and models go back to the system, not to the heap
    device = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = select_jobs(plan, only)
    todo = [j for j in jobs if not (out / j.id / MANIFEST).is_file()]
    outcomes = [Outcome(j.id, out / j.id, skipped=True) for j in jobs if j not in todo]
    for o in outcomes:
        log.info("%s: already built in %s, skipped", o.variant, o.path)
    if not todo:
        return outcomes
    model_dir = Path(source) if source is not None else local_checkpoint(plan.record.model)
    for stage in STAGES.values():
        stage_jobs = [j for j in todo if backend(j.method).stage == stage.name]
        if stage_jobs:
            outcomes += stage.build().build(plan, stage_jobs, model_dir, out, model=plan.record.model, device=device,
                                            calibration_file=calibration_file, stream=stream)
    order = {j.id: i for i, j in enumerate(jobs)}
    return sorted(outcomes, key=lambda o: order[o.variant])
