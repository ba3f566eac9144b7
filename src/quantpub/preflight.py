"""Every check of a run's inputs, before any work dir, hub or process is created.

The source (config, every weight file and shard its index names, readable headers and whole
files, a tokenizer that loads, a supported architecture, GPTQ group sizes that fit the layers),
the calibration and evaluation text (exists, is text, long enough after tokenization), the
publish target (reachable, the token valid and allowed to write the namespace) and the work
dir (a writable directory with room for the plan's sizes). Each problem is one line naming the
file, key, URL or variant and saying how to fix it; ``quantpub run`` prints them all and exits 2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantpub import naming
from quantpub.errors import QuantpubError
from quantpub.matrix import AwqTarget, CalibrationSpec, GptqVariant
from quantpub.matrix_formats import CtScheme, MlxTarget
from quantpub.plan import Plan, make_plan

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
GGUF_WORKSPACE = 4  # the 16-bit GGUF kept beside the types: about 4x the largest type


class PreflightError(QuantpubError):
    """One or more problems found before the run; ``problems`` has one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Inputs:
    """What ``quantpub run`` was given, after the CLI resolved names and defaults."""

    matrix: Path
    models: list[str]
    work: Path
    calibration_file: str | None = None
    eval_file: str | None = None
    evaluate: bool = True
    publish_to: str | None = None  # None: the built-in hub
    token: str | None = None
    namespace: str | None = None
    device: str = "cpu"
    n_samples: int | None = None
    seq_len: int | None = None
    context: int | None = None
    windows: int | None = None


@dataclass
class Checked:
    """Plans of every model, and the problems found (empty when the run may start)."""

    plans: dict[str, Plan] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check(inputs: Inputs) -> Checked:
    """Run every check; never creates a file or directory."""
    result = Checked()
    names: dict[str, str] = {}
    for model in inputs.models:
        name = naming.model_basename(model)
        if name in names:
            result.problems.append(f"model {model}: same name {name!r} as {names[name]}; their work dirs and repos "
                                   "would collide; quantize one of them in another run")
            continue
        names[name] = model
        try:
            plan = make_plan(inputs.matrix, model, device="cpu" if inputs.device == "cpu" else "cuda",
                             n_samples=inputs.n_samples, seq_len=inputs.seq_len)
        except QuantpubError as exc:
            result.problems.append(str(exc))
            continue
        result.plans[model] = plan
        result.problems += [f"model {model}: {p}" for p in plan.problems]
        result.problems += check_source(model, plan)
        if not plan.problems:
            result.problems += check_data(model, plan, inputs)
    if result.plans:
        result.problems += check_target(inputs, next(iter(result.plans.values())))
        result.problems += check_work(inputs.work, list(result.plans.values()))
    return result


# the source checkpoint

def check_source(model: str, plan: Plan) -> list[str]:
    problems = []
    path = Path(model)
    if path.is_dir():
        problems += check_weights(path)
        problems += _tokenizer_problems(model, path)
    else:
        problems += _hub_source_problems(model)
    problems += check_group_sizes(model, plan)
    return problems


def check_weights(model_dir: Path) -> list[str]:
    """Every weight file the checkpoint needs is there, whole and readable."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                return [f"{index}: cannot read the shard index ({exc}); re-download it"]
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                return [f"{model_dir / missing[0]}: missing shard ({len(missing)} of {len(shards)} named by "
                        f"{index_name} are missing); download the whole checkpoint again"]
            return [p for s in shards if (p := _weight_file_problem(model_dir / s))]
        if (model_dir / single).is_file():
            problem = _weight_file_problem(model_dir / single)
            return [problem] if problem else []
    return [f"{model_dir}: no weights (model.safetensors, a sharded index, or pytorch_model.bin); "
            "point --model at a complete checkpoint"]


def _weight_file_problem(path: Path) -> str | None:
    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path}: {size} bytes, not a safetensors file; re-download it"
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 << 20):
                return f"{path}: header length {length} does not fit a {size}-byte file; the file is damaged, re-download it"
            try:
                header = json.loads(fh.read(length))
            except ValueError:
                return f"{path}: unreadable safetensors header; the file is damaged, re-download it"
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        expected = 8 + length + end
        if size < expected:
            return f"{path}: truncated ({size} of {expected} bytes); re-download it"
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"{path}: not a readable PyTorch checkpoint ({exc}); re-download it"
    return None


def _tokenizer_problems(model: str, model_dir: Path) -> list[str]:
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return [f"{model_dir}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the original model's tokenizer "
                "files into the checkpoint"]
    try:
        load_tokenizer(model_dir)
    except Exception as exc:  # noqa: BLE001 - tokenizers fail in many ways
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [f"{model_dir}: the tokenizer does not load ({type(exc).__name__}: {first[:200]}); fix or replace "
                "its tokenizer files"]
    return []


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _hub_source_problems(model: str) -> list[str]:
    """A hub repo: its file list names weights (and every shard) and a tokenizer; nothing is downloaded."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = set(HfApi().list_repo_files(model))
    except (HfHubHTTPError, OSError) as exc:
        return [f"model {model}: cannot list its files on the hub ({type(exc).__name__}); check the id and HF_TOKEN"]
    if not any(name in files for name in TOKENIZER_FILES):
        return [f"model {model}: the repo has no tokenizer files; quantize a repo that ships its tokenizer"]
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index_name in files:
            try:
                shards = set(json.loads(Path(hf_hub_download(model, index_name)).read_text())["weight_map"].values())
            except (HfHubHTTPError, OSError, ValueError, KeyError) as exc:
                return [f"model {model}: cannot read {index_name} ({exc})"]
            missing = sorted(shards - files)
            return [f"model {model}: shard {missing[0]} named by {index_name} is not in the repo"] if missing else []
        if single in files:
            return []
    return [f"model {model}: the repo has no weights (model.safetensors or pytorch_model.bin)"]


def check_group_sizes(model: str, plan: Plan) -> list[str]:
    """A group size must divide the input size of every layer it quantizes: GPTQ, AWQ (GPTQModel's AWQ
    raises mid-run otherwise), compressed-tensors W4A16 (transformers refuses to load it: "tensor column
    shape must be divisible by the given group_size") and MLX."""
    inputs = sorted({lin.in_features for lin in plan.facts.block_linears()})
    refused: dict[tuple[int, int], list[str]] = {}  # (group size, an input it does not divide) -> variants
    for job in plan.jobs:
        p = job.variant.params
        group = p.resolved_group_size if isinstance(p, CtScheme) else \
            p.group_size if isinstance(p, (GptqVariant, AwqTarget, MlxTarget)) else None
        if group is not None:
            bad = [n for n in inputs if n % group]
            if bad:
                refused.setdefault((group, bad[0]), []).append(job.id)
    return [f"model {model}: variant{'s' * (len(ids) > 1)} {', '.join(ids)}: group size {group} does not divide the "
            f"layer input size {size}; use a group size that divides {', '.join(map(str, inputs))} (or none) for "
            "this model" for (group, size), ids in refused.items()]


# calibration and evaluation text

def check_data(model: str, plan: Plan, inputs: Inputs) -> list[str]:
    """Calibration and evaluation text exist, are text, and hold enough tokens."""
    from quantpub import calibration

    needs: dict[tuple, tuple[CalibrationSpec, int]] = {}
    for job in plan.jobs:
        spec = job.variant.calibration
        if spec is None:
            continue
        tokens = job.n_samples * job.seq_len  # the plan has the overrides
        key = (inputs.calibration_file,) if inputs.calibration_file else (spec.dataset, spec.config, spec.split,
                                                                            spec.text_column)
        needs[key] = (spec, max(tokens, needs.get(key, (spec, 0))[1]))
    evaluation = plan.matrix.evaluation if inputs.evaluate else None
    if not needs and evaluation is None:
        return []
    model_dir = Path(model)
    try:
        tokenizer = load_tokenizer(model_dir) if model_dir.is_dir() else _hub_tokenizer(model)
    except Exception:  # noqa: BLE001 - reported by the source checks
        return []
    problems = []
    for spec, tokens_needed in needs.values():
        source = inputs.calibration_file or _dataset_name(spec)
        try:
            text_problem = _not_text(inputs.calibration_file)
            if text_problem:
                problems.append(f"calibration data {source}: {text_problem}")
                continue
            text, source = calibration.load_text(spec, inputs.calibration_file)
            have = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        except QuantpubError as exc:
            problems.append(f"{exc}; pass a text file with --calibration-file")
            continue
        if have < tokens_needed:
            problems.append(f"calibration data {source}: {have} tokens, fewer than the {tokens_needed} the plan "
                            f"needs (n_samples x seq_len); use a longer text or lower --n-samples / --seq-len")
    if evaluation is not None:
        problems += _evaluation_problems(tokenizer, evaluation, inputs)
    return problems


def _evaluation_problems(tokenizer, spec, inputs: Inputs) -> list[str]:
    from quantpub.evaluate import held_out, load_eval_text

    source = inputs.eval_file or _dataset_name(spec)
    text_problem = _not_text(inputs.eval_file)
    if text_problem:
        return [f"evaluation data {source}: {text_problem}"]
    try:
        text, origin = load_eval_text(spec, inputs.eval_file)
        held_out(tokenizer, text, origin, context=inputs.context or spec.context,
                 stride=inputs.context or spec.context, windows=inputs.windows or spec.windows)
    except QuantpubError as exc:
        return [f"{exc}; pass --eval-file with local held-out text, or --no-evaluate"]
    return []


def _not_text(file: str | None) -> str | None:
    """Why a local data file cannot be text (None when it can, or when there is no file)."""
    if file is None:
        return None
    path = Path(file)
    if not path.is_file():
        return "no such file"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    if path.suffix == ".parquet":
        return None
    with path.open("rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        return "the file is empty"
    if b"\0" in head:
        return "a binary file, not text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            return "not UTF-8 text"
    return None


def _dataset_name(spec: Any) -> str:
    return f"{spec.dataset}/{spec.config}:{spec.split}" if spec.config else f"{spec.dataset}:{spec.split}"


def _hub_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


# the publish target and the work dir

def check_target(inputs: Inputs, plan: Plan) -> list[str]:
    """The hub answers, the token is valid, and its user may write the namespace."""
    if inputs.publish_to is None:
        return []  # the built-in hub: started by the run itself
    import httpx2

    url = inputs.publish_to.rstrip("/")
    namespace = inputs.namespace or plan.matrix.repos.namespace
    if not inputs.token:
        return [f"--publish-to {url}: no token; pass --token or set HF_TOKEN to a write token for {namespace}"]
    try:
        reply = httpx2.get(f"{url}/api/whoami-v2", headers={"Authorization": f"Bearer {inputs.token}"}, timeout=10)
    except httpx2.HTTPError as exc:
        return [f"--publish-to {url}: cannot reach it ({type(exc).__name__}: {exc}); start the hub or fix the URL"]
    if reply.status_code == 401:
        return [f"--publish-to {url}: the token was refused (401); pass a valid --token or HF_TOKEN"]
    if reply.status_code != 200:
        return [f"--publish-to {url}: whoami answered HTTP {reply.status_code}; is this a Hub API endpoint?"]
    try:
        who = reply.json()
    except ValueError:
        return [f"--publish-to {url}: whoami did not answer JSON; is this a Hub API endpoint?"]
    return whoami_problems(url, who, namespace)


def whoami_problems(url: str, who: dict[str, Any], namespace: str) -> list[str]:
    """The Hub's whoami-v2 answer, read for write access to ``namespace``."""
    name = who.get("name")
    orgs = [o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict)]
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return [f"--publish-to {url}: the token of {name} is read-only; use a write token"]
    if namespace != name and namespace not in orgs:
        return [f"--publish-to {url}: user {name} cannot write namespace {namespace!r} (member of: "
                f"{', '.join(orgs) or 'no organisation'}); pass --namespace {name} or a token of that namespace"]
    return []


def check_work(work: Path, plans: list[Plan]) -> list[str]:
    """A writable directory (or one that can be made) with room for every variant still to build."""
    work = Path(work)
    if work.exists() and not work.is_dir():
        return [f"--work {work}: is a file, not a directory; choose a directory"]
    existing = work
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return [f"--work {work}: {existing} is not a directory; choose another --work"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"--work {work}: {existing} is not writable (read-only filesystem or permissions); "
                "choose another --work"]
    need = sum(disk_need(plan, work / plan.facts.name) for plan in plans)
    free = shutil.disk_usage(existing).free
    if need > free:
        return [f"--work {work}: the variants still to build need about {need / 1e9:.1f} GB and only "
                f"{free / 1e9:.1f} GB is free; free space or choose another --work"]
    return []


def disk_need(plan: Plan, out: Path) -> int:
    """Bytes the plan's variants not yet built will take, with the GGUF conversion's workspace."""
    from quantpub.artifacts import MANIFEST

    todo = [j for j in plan.jobs if not (out / j.id / MANIFEST).is_file()]
    if not todo:
        return 0
    need = int(sum(j.size for j in todo) * 1.2)
    if any(j.method == "gguf" for j in todo):
        need += max(j.size for j in todo) * GGUF_WORKSPACE
    return need


def read_models_file(path: str | Path) -> list[str]:
    """One model per line; ``#`` starts a comment; blank lines are skipped.

    Raises:
        QuantpubError: the file is missing or names no model.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantpubError(f"--models-file {path}: cannot read it ({exc})") from None
    models = [line.split("#", 1)[0].strip() for line in lines]
    # a checkpoint directory named relative to the file (or else to the current directory), hub ids as written
    models = [str((path.parent / m).resolve()) if (path.parent / m).is_dir() else
              os.path.abspath(m) if Path(m).is_dir() else m for m in models if m]
    if not models:
        raise QuantpubError(f"--models-file {path}: names no model (one hub id or path per line)")
    return models
