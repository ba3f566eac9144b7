"""Matrix + model config -> the ordered jobs, with sizes and memory, before any work starts.

``make_plan`` reads the matrix file and the source's config and card; ``write_plan`` records the
plan in the output directory (``plan_record``: ``OUT/plan.json`` and the text snapshots), and
``load_plan`` gives every later stage the same plan back without reading any of them again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from quantpub import naming
from quantpub.formatting import gb
from quantpub.backends import BACKENDS, backend
from quantpub.matrix import Matrix
from quantpub.variants import VariantSpec, expand, load_matrix
from quantpub.plan_record import (PlanRecord, matrix_sha256, read as read_record, read_snapshot, snapshot,
                                  source_facts, text_key, write as write_record)
from quantpub.source import ModelFacts, model_facts
from quantpub.source.card import Source
from quantpub.source.prompt import PromptTemplate

AUTO_SEQ_LEN_CAP = 4096
EXAMPLE_MODEL = str(Path(__file__).parent / "examples" / "tulu-7b")
Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class Job:
    """One variant of one model, with everything decided that can be decided from the config."""

    variant: VariantSpec
    repo: str
    target: str  # hub branch (GPTQ, AWQ) or file name on main (GGUF)
    seq_len: int | None  # resolved calibration length; None when no calibration is needed
    n_samples: int | None
    size: int  # estimated bytes on disk
    device_memory: int | None  # estimated accelerator bytes; None for CPU-only work
    host_memory: int
    stream_host_memory: int | None = None  # GPTQ/AWQ reading the model layer by layer from the checkpoint

    @property
    def id(self) -> str:
        return self.variant.id

    @property
    def method(self) -> str:
        return self.variant.method

    def describe(self) -> str:
        p = self.variant.params
        calibrated = self.seq_len and p.calibrated()
        return p.describe() + (f"{p.CALIBRATED_BY} seq={self.seq_len} n={self.n_samples}" if calibrated else "")


@dataclass(frozen=True)
class Plan:
    matrix_path: str
    matrix: Matrix
    facts: ModelFacts
    device: Device
    jobs: tuple[Job, ...]
    notes: tuple[str, ...]  # worth knowing, not blocking
    problems: tuple[str, ...]  # blocking: nothing may start while any is present
    record: PlanRecord | None = None  # what plan.json holds (the matrix's content, the config, the source's card)
    out: Path | None = None  # where the plan was written or read from (its text snapshots are there)

    @property
    def source(self) -> Source:
        """What the source's card says (name, creator, licence, prompt template), as read when the plan was made."""
        facts = dict(self.record.source)
        facts["prompt"] = PromptTemplate(**{**facts["prompt"], "alternatives": tuple(facts["prompt"]["alternatives"])})
        return Source(**facts)

    def text(self, role: str, spec, file: str | Path | None = None) -> tuple[str, str, dict[str, str | None]]:
        """(text, where it came from, its origin record) for ``spec`` (``role``: calibration or evaluation): the
        snapshot the plan recorded, else (a plan not written yet) read from ``file`` or the spec's dataset."""
        from quantpub import calibration

        snap = self.record.texts.get(text_key(role, spec)) if self.record and self.out else None
        if snap is not None:
            return read_snapshot(self.out, snap), snap.source, snap.origin
        text, source = calibration.load_text(spec, file)
        return text, source, calibration.origin(spec, file)

    @property
    def repos(self) -> list[str]:
        return list(dict.fromkeys(job.repo for job in self.jobs))

    def to_dict(self) -> dict[str, Any]:
        f = self.facts
        return {
            "matrix": self.matrix_path,
            "model": {
                "id": f.model, "name": f.name, "model_type": f.model_type,
                "parameters": f.total_params, "context_length": f.context_length,
                "rope_scaling": f.rope_scaling, "sliding_window": f.sliding_window,
                "experts": f.num_experts,
            },
            "device": self.device,
            "jobs": [
                {"variant": j.id, "method": j.method, "parameters": j.describe(), "repo": j.repo,
                 "branch": j.variant.branch, "file": None if j.variant.branch else j.target,
                 "seq_len": j.seq_len, "n_samples": j.n_samples, "estimated_size": j.size,
                 "estimated_device_memory": j.device_memory, "estimated_host_memory": j.host_memory,
                 "estimated_streamed_host_memory": j.stream_host_memory}
                for j in self.jobs
            ],
            "notes": list(self.notes),
            "problems": list(self.problems),
        }


def make_plan(matrix_path: str | Path, model: str, *, device: Device = "cuda",
              config: dict[str, Any] | None = None, n_samples: int | None = None,
              seq_len: int | None = None) -> Plan:
    """Read the matrix, the model's config and its card, and decide every job.

    Problems (unsupported architecture, calibration longer than the context) are collected in
    ``Plan.problems`` rather than raised, so the whole plan can still be shown. ``n_samples`` /
    ``seq_len`` override the matrix's calibration size for every job.

    Raises:
        MatrixError: the matrix file is invalid.
        ModelError: the model's config cannot be read.
    """
    from quantpub.source import read_config
    from quantpub.source.card import read_source

    matrix, _ = load_matrix(matrix_path)
    config = read_config(model) if config is None else config
    record = PlanRecord(model=model, matrix_path=str(matrix_path), matrix_sha256=matrix_sha256(Path(matrix_path)),
                        matrix=matrix.model_dump(mode="json"), config=config, device=device, n_samples=n_samples,
                        seq_len=seq_len, source=source_facts(read_source(model, matrix.card.model_dump())))
    return plan_from(record)


def load_plan(out: str | Path) -> Plan:
    """The plan written to ``out`` (``write_plan``): the matrix, config and card facts as they were then.

    Raises:
        PlanFileError: there is none, or it cannot be read.
    """
    return replace(plan_from(read_record(Path(out))), out=Path(out))


def write_plan(plan: Plan, out: str | Path, *, calibration_file: str | Path | None = None,
               eval_file: str | Path | None = None, evaluation: bool = True) -> Plan:
    """Record ``plan`` in ``out`` (``plan.json``), with every calibration text its jobs read (and, with
    ``evaluation``, the evaluation text) snapshotted into ``OUT/inputs/`` first, each read once, here. Returns the
    plan as ``load_plan`` gives it.
    """
    from quantpub import calibration

    out = Path(out)
    wanted = {text_key("calibration", j.variant.calibration): (j.variant.calibration, calibration_file)
              for j in plan.jobs if j.variant.calibration is not None}
    if any(j.variant.calibration is None for j in plan.jobs):  # GGUF validates on the calibration text's second half
        wanted[text_key("calibration", plan.matrix.calibration)] = (plan.matrix.calibration, calibration_file)
    if evaluation:
        spec = plan.matrix.evaluation
        wanted[text_key("evaluation", spec)] = (spec.as_text_source(), eval_file)
    snaps = {}
    for key, (spec, file) in wanted.items():
        text, source = calibration.load_text(spec, file)
        snaps[key] = snapshot(out, key, text, source, calibration.origin(spec, file))
    record = plan.record.model_copy(update={"texts": snaps})
    write_record(out, record)
    return replace(plan, record=record, out=out)


def plan_from(record: PlanRecord) -> Plan:
    """The plan ``record`` describes: the matrix's variants for the model, sized for the device."""
    matrix = Matrix.model_validate(record.matrix)
    specs = expand(matrix, record.matrix_path)
    facts = model_facts(record.model, record.config)
    model, device = record.model, record.device
    notes: list[str] = []
    problems: list[str] = []

    unsupported = sorted({s.method for s in specs if facts.model_type not in BACKENDS[s.method].model_types})
    if unsupported:  # one line for the model, whatever the number of sections that cannot take it
        supported = sorted(set.intersection(*(set(BACKENDS[m].model_types) for m in unsupported)))
        problems.append(f"model_type {facts.model_type!r} ({', '.join(facts.architectures) or 'no architectures'}) "
                        f"is not supported by the {', '.join(unsupported)} section{'s' * (len(unsupported) > 1)} of "
                        f"the matrix (they support {', '.join(supported)}); quantize a model of a supported "
                        "architecture, or remove those sections from the matrix")

    jobs = []
    for spec in specs:
        seq_len = _seq_len(spec, facts, notes, problems)
        job = _job(spec, matrix, facts, device, seq_len)
        if job.seq_len is not None:  # the overrides: a smoke run calibrates on fewer or shorter windows
            job = replace(job, n_samples=record.n_samples or job.n_samples, seq_len=record.seq_len or job.seq_len)
        jobs.append(job)
    if facts.num_experts > 1:
        notes.append(f"mixture of experts: {facts.num_experts} experts, {facts.experts_per_token} per token; "
                     "each expert sees about "
                     f"{facts.experts_per_token / facts.num_experts:.0%} of the calibration tokens")
    plan = Plan(record.matrix_path, matrix, facts, device, tuple(jobs), (), tuple(dict.fromkeys(problems)), record)
    if Path(model).is_dir() and not plan.source.prompt.known:  # a hub id's card may just not have been reachable
        notes.append("prompt template unknown: no chat_template in the tokenizer config and no known format in the "
                     "model card; the cards will say 'Unknown' unless the matrix sets card.prompt_template")
    return replace(plan, notes=tuple(dict.fromkeys(notes)))


def _seq_len(spec: VariantSpec, facts: ModelFacts, notes: list[str], problems: list[str]) -> int | None:
    if spec.calibration is None:
        return None
    requested = spec.calibration.seq_len
    ctx = facts.context_length
    if requested == "auto":
        seq_len = min(ctx, AUTO_SEQ_LEN_CAP)
    elif requested > ctx:
        problems.append(f"{spec.id}: calibration seq_len {requested} is longer than the model's context "
                        f"({ctx}); lower seq_len or use auto")
        seq_len = requested
    else:
        seq_len = requested
    if seq_len < ctx and ctx > AUTO_SEQ_LEN_CAP:
        notes.append(f"long-context model: calibrating at {seq_len} tokens of its {ctx}-token context "
                     f"({_rope(facts)}); the quantized model keeps the full context, but accuracy on "
                     "prompts longer than the calibration length is not calibrated")
    return seq_len


def _rope(facts: ModelFacts) -> str:
    if facts.rope_scaling:
        kind = facts.rope_scaling.get("rope_type") or facts.rope_scaling.get("type")
        return f"rope scaling {kind} x{facts.rope_scaling.get('factor')}"
    if facts.sliding_window:
        return f"sliding window {facts.sliding_window}"
    return "no rope scaling"


def _job(spec: VariantSpec, matrix: Matrix, facts: ModelFacts, device: Device, seq_len: int | None) -> Job:
    b = backend(spec.method)
    n_samples = spec.calibration.n_samples if spec.calibration else None
    repo = b.repo_id(matrix, spec, facts.name)
    # files side by side on main are named by the section's file name template; the others get a branch each
    target = naming.gguf_filename(facts.name, spec.params.label, getattr(matrix, spec.method).file_name) \
        if b.files_on_main else spec.branch
    dev, host, streamed = b.plan_memory(facts, spec, n_samples=n_samples, seq_len=seq_len, device=device)
    return Job(spec, repo, target, seq_len, n_samples, b.size(facts, spec.params), dev, host, streamed)


def render(plan: Plan) -> str:
    """The plan as a fixed-width table with its notes and problems."""
    f = plan.facts
    head = (f"plan for {f.name} ({f.model_type}, {f.total_params / 1e9:.2f}B parameters, "
            f"context {f.context_length}) from {plan.matrix_path}; memory estimated for {plan.device}")
    rows = [("variant", "method", "parameters", "branch / file", "size", "GPU mem", "CPU mem", "repo")]
    for j in plan.jobs:
        rows.append((j.id, j.method, j.describe(), j.target, gb(j.size),
                     "-" if j.device_memory is None else gb(j.device_memory), gb(j.host_memory), j.repo))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    total = sum(j.size for j in plan.jobs)
    lines.append(f"\n{len(plan.jobs)} variants, {gb(total)} in all, into {', '.join(plan.repos)}")
    streamed = [j.stream_host_memory for j in plan.jobs if j.stream_host_memory]
    if streamed:
        lines.append(f"note: streamed layer by layer from the checkpoint (--stream; automatic when the model does not "
                     f"fit the machine's memory), GPTQ/AWQ need about {gb(max(streamed))} of CPU memory")
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"problem: {p}" for p in plan.problems]
    return "\n".join(lines)
