"""The GGUF builder (stage ``quantize-gguf``): one conversion, every type in parallel, each validated and moved
into place whole.

``OUT/.work/`` keeps the 16-bit GGUF until every GGUF variant of the run is built, so an
interrupted run converts again only if it had not finished converting.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from quantpub import calibration, isolate, machine, naming, progress
from quantpub.backends import gguf_files, llamacpp
from quantpub.built import Outcome, move_into_place, write_manifest
from quantpub.errors import QuantizeError
from quantpub.plan import Job, Plan

log = logging.getLogger(__name__)
VALIDATION_TOKENS = 256


def build(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, *, model: str, device: str,
          calibration_file: str | Path | None, stream: bool = False) -> list[Outcome]:
    """Build ``jobs`` (GGUF types of ``plan`` not built yet) from the checkpoint ``model_dir``.

    The importance matrix runs on ``device`` where this process sees a GPU, else on the CPU (a run
    gives this stage CPU cores and no GPU slot). Validation reads the second half of the calibration
    text; the importance matrix's windows may come from anywhere.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = jobs[0].variant.calibration or plan.matrix.calibration
    text, source, origin = plan.text("calibration", spec, calibration_file)
    calib = None
    if jobs[0].variant.calibration is not None:
        calib = calibration.build(text, source, tokenizer, n_samples=jobs[0].n_samples, seq_len=jobs[0].seq_len,
                                  seed=spec.seed, origin=origin)
    try:
        return build_gguf_set(plan, jobs, model_dir, out, model, tokenizer=tokenizer, text=text[len(text) // 2:],
                              text_source=f"{source} (second half)", calib=calib, device=_imatrix_device(device),
                              log_dir=out / "logs" / "quantize-gguf")
    except Exception as exc:  # noqa: BLE001 - conversion failed: every GGUF variant fails, others stand
        log.error("GGUF: %s: %s", type(exc).__name__, exc)
        return [Outcome(j.id, None, error=f"{type(exc).__name__}: {exc}") for j in jobs]


def _imatrix_device(device: str) -> str:
    """``device``, or the CPU when no GPU is visible here (``--device cuda`` names the GPU stages' device)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "cpu"
    return device


def build_gguf_set(plan: Plan, jobs: list[Job], model_dir: Path, out: Path, model: str, *, tokenizer,
                   text: str, text_source: str, calib: calibration.CalibrationSet | None, device: str,
                   split_max_bytes: int = gguf_files.HUB_FILE_LIMIT, log_dir: Path) -> list[Outcome]:
    """Build ``jobs`` (all GGUF, not built yet) from ``model_dir``; returns one Outcome per job.

    The conversion is a subprocess; the importance matrix, the 16-bit reference and every type's
    quantization and validation run in ``isolate.Isolated`` workers, so a crash in llama.cpp or
    torch costs the variants that needed that step and nothing else. Per-variant logs go to ``log_dir``.
    """
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    outtype = gguf_files.sixteen_bit_type({"torch_dtype": plan.facts.torch_dtype})
    name = plan.facts.name
    base = work / f"{name}.{outtype.upper()}.gguf"
    convert_seconds = None  # None: converted by an earlier run (its 16-bit file was kept)
    cores = machine.cpu_count()
    for job in jobs:
        progress.report(job.id, "converting")
    if not base.is_file():
        log.info("GGUF: converting %s to %s with llama.cpp's converter", model_dir, outtype)
        convert_seconds = round(llamacpp.convert(model_dir, base, outtype, general_metadata(plan, jobs)), 2)
        log.info("GGUF: converted in %.1fs -> %s (%.1f MB)", convert_seconds, base,
                 base.stat().st_size / 1e6)
    workers = gguf_files.workers_for(len(jobs), base.stat().st_size)
    threads = max(1, cores // workers)
    failed: dict[str, Outcome] = {}
    imatrix, imatrix_record, imatrix_file = None, None, None
    if calib is not None and any(j.variant.params.takes_imatrix() for j in jobs):
        started = time.monotonic()
        try:  # a process of its own, gone once it is done: the source model it loads is not kept beside the pool
            with isolate.Isolated(log_dir, 1) as once:
                matrix = once.call("imatrix", "imatrix", _imatrix, model_dir, calib, plan.facts.num_layers, device)
        except isolate.Ended as exc:  # only the types that take it fail; the others go on
            failed.update({j.id: Outcome.ended(j.id, exc) for j in jobs if j.variant.params.takes_imatrix()})
        else:
            imatrix_file = work / naming.imatrix_filename(name)
            matrix.write(imatrix_file, datasets=[_describe(calib)], chunk_size=calib.seq_len)
            imatrix = matrix.values()
            imatrix_record = {**matrix.record, "seconds": round(time.monotonic() - started, 2),
                              "file": imatrix_file.name, "format": "llama.cpp GGUF imatrix",
                              "datasets": [_describe(calib)]}
            log.info("GGUF: importance matrix for %d tensors from %d samples in %.1fs -> %s",
                     imatrix_record["tensors"], imatrix_record["samples"], imatrix_record["seconds"],
                     imatrix_file.name)
    with isolate.Isolated(log_dir, workers, preload=("llama_cpp",)) as pool:
        try:
            reference = pool.call(outtype.upper(), "reference", gguf_files.validate_file, base, text, VALIDATION_TOKENS,
                                  cores)
        except isolate.Ended as exc:  # nothing can be judged without it: every type fails, once, with this reason
            return [failed.get(j.id) or Outcome.ended(j.id, exc) for j in jobs]
        kv = imatrix_metadata(imatrix, calib, imatrix_file) if imatrix is not None else {}
        expect = _expectations(tokenizer, plan, {**general_metadata(plan, jobs), **kv})
        todo = [j for j in jobs if j.id not in failed]
        log.info("GGUF: quantizing %d types, %d at a time with %d threads each", len(todo), workers, threads)
        context = dict(base=base, out=out, model=model, outtype=outtype, imatrix=imatrix,
                       imatrix_record=imatrix_record, imatrix_file=imatrix_file, kv=kv, calib=calib,
                       reference=reference, expect=expect, text=text, text_source=text_source, threads=threads,
                       split_max_bytes=split_max_bytes, convert_seconds=convert_seconds,
                       device=device, pool=pool)

        def run(job: Job):
            progress.report(job.id, "quantizing")
            try:
                outcome = Outcome(job.id, _build_one(job, **context))
            except isolate.Ended as exc:
                outcome = Outcome.ended(job.id, exc)
            except Exception as exc:  # noqa: BLE001 - one type's failure must not stop the others
                log.error("%s: failed: %s", job.id, exc)
                outcome = Outcome(job.id, None, error=f"{type(exc).__name__}: {exc}")
            progress.report(job.id, outcome.phase, **({"error": outcome.error} if outcome.error else {}))
            return outcome

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gguf") as threads_pool:
            built = {o.variant: o for o in threads_pool.map(run, todo)}
    log.info("GGUF: %d types in %.1fs", len(todo), time.monotonic() - started)
    outcomes = [failed.get(j.id) or built[j.id] for j in jobs]
    for o in failed.values():
        progress.report(o.variant, o.phase, error=o.error)
    if all(o.error is None for o in outcomes):
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def _build_one(job: Job, *, base: Path, out: Path, model: str, outtype: str, imatrix, imatrix_record,
               imatrix_file: Path | None, kv: dict, calib, reference, expect, text: str, text_source: str, threads: int,
               split_max_bytes: int, convert_seconds: float | None, device: str, pool: isolate.Isolated) -> Path:
    variant = job.variant.params
    final = out / job.id
    partial = out / f".partial-{job.id}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        target = partial / job.target
        if not variant.takes_imatrix():  # nor does the file say it had one
            imatrix, imatrix_record, imatrix_file, kv = None, None, None, {}
            expect = replace(expect, metadata={k: v for k, v in expect.metadata.items()
                                               if not k.startswith("quantize.imatrix.")})
        seconds = pool.call(job.id, "quantize", llamacpp.quantize_file, base, target, variant, imatrix=imatrix,
                            threads=threads, kv=kv)
        files = gguf_files.split(target, split_max_bytes) if target.stat().st_size > split_max_bytes else [target]
        meta, tensors = gguf_files.read(files)
        problems = gguf_files.check_mix(variant, tensors) + gguf_files.check_metadata(meta, variant.type, expect)
        if len(files) > 1 and meta.get("split.count") != len(files):
            problems.append(f"split.count is {meta.get('split.count')}, expected {len(files)}")
        if problems:
            raise QuantizeError(job.id, model, "; ".join(problems))
        progress.report(job.id, "validating")
        result = pool.call(job.id, "validate", gguf_files.validate_file, files[0], text, VALIDATION_TOKENS, threads)
        broken = gguf_files.garbage(result, reference)
        if broken:
            raise QuantizeError(job.id, model, broken)
        validation = {**result, "text": text_source, "reference_perplexity": reference["perplexity"],
                      "type_mix": gguf_files.type_mix(tensors), "metadata_checked": _checked(expect),
                      "shards": len(files)}
        if imatrix_file is not None:  # published beside the files: one link per variant, one file on disk
            _link(imatrix_file, partial / imatrix_file.name)
        write_manifest(partial, job, calib if imatrix is not None else None, model, device, round(seconds, 3),
                       validation, sixteen_bit=outtype, imatrix=imatrix_record, convert_seconds=convert_seconds,
                       size=sum(f.stat().st_size for f in files))  # the model, not the imatrix
        move_into_place(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("%s: built and validated (%.2fs quantize, perplexity %.1f vs %.1f for %s) -> %s", job.id, seconds,
             result["perplexity"], reference["perplexity"], outtype, final)
    return final


def _link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, dest)


def _describe(calib: calibration.CalibrationSet) -> str:
    """The calibration text of an importance matrix, as its file and the card name it (a local
    file by its name: the path is this machine's)."""
    source = f"{Path(calib.source).name} (local file)" if Path(calib.source).exists() else calib.source
    return f"{source}: {calib.n_samples} samples of {calib.seq_len} tokens (seed {calib.seed}, sha256 {calib.sha256})"


def general_metadata(plan: Plan, jobs: list[Job]) -> dict[str, str]:
    """``general.*`` keys of every GGUF file: the model's name, who quantized it, the repo it is published in."""
    card = plan.matrix.card
    url = f"{naming.HUB_URL}/{jobs[0].repo}"
    return {"general.name": card.model_name or plan.facts.name, "general.quantized_by": card.quantized_by or "quantpub",
            "general.repo_url": url, "general.url": url}


def imatrix_metadata(imatrix: dict, calib: calibration.CalibrationSet, imatrix_file: Path) -> dict[str, str | int]:
    """The ``quantize.imatrix.*`` keys ``llama-quantize`` writes (tools/quantize/quantize.cpp at the pinned
    llama.cpp): the imatrix file (published beside the GGUF files), its dataset, entries and chunks (one per
    calibration window)."""
    return {"quantize.imatrix.file": imatrix_file.name[:127], "quantize.imatrix.dataset": _describe(calib)[:127],
            "quantize.imatrix.entries_count": len(imatrix), "quantize.imatrix.chunks_count": calib.n_samples}


def _expectations(tokenizer, plan: Plan, metadata: dict[str, Any]) -> gguf_files.Expectations:
    return gguf_files.Expectations(
        context_length=plan.facts.context_length, rope_scaling=plan.facts.rope_scaling,
        chat_template=getattr(tokenizer, "chat_template", None) or None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, metadata=metadata)


def _checked(expect: gguf_files.Expectations) -> list[str]:
    keys = ["context_length", "file_type", *expect.metadata]
    keys += ["rope_scaling"] if expect.rope_scaling else []
    keys += ["chat_template"] if expect.chat_template else []
    keys += [k for k in ("bos_token_id", "eos_token_id") if getattr(expect, k) is not None]
    return keys


def _imatrix(model_dir: Path, calib: calibration.CalibrationSet, n_layers: int, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device)
    model.eval()
    try:
        return gguf_files.compute_imatrix(model, [list(s) for s in calib.samples], n_layers)
    finally:
        del model
