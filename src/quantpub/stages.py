"""The stages of a run, as plain functions: each runs in a worker process (or a Ray task) and
returns a small, picklable result. They know nothing of the scheduler, the executor or the ledger.

    prepare        the checkpoint: a local directory as it is, a hub id downloaded into WORK/sources
    quantize       one group of variants (GPTQ/AWQ on a GPU slot, or the GGUF set on CPU cores)
    evaluate       perplexity and KLD of every built variant against the unquantised model
    publish        the cards, then every built variant to the hub
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantpub import naming, progress

SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py", "README.md",
                   "LICENSE*"]


@dataclass(frozen=True)
class RunOptions:
    calibration_file: str | None = None
    eval_file: str | None = None
    device: str = "auto"
    n_samples: int | None = None
    seq_len: int | None = None
    namespace: str | None = None
    token: str | None = None
    max_attempts: int = 2
    evaluate: bool = True
    context: int | None = None  # None: the matrix's evaluation.context
    windows: int | None = None  # None: the matrix's evaluation.windows
    executor: str = "local"
    ray_address: str | None = None
    slots: int | None = None  # GPU slots on a machine without GPUs (default 1); Ray: GPUs declared locally
    models_in_flight: int | None = None  # default: 2 x GPU slots + 1
    card_hub: str | None = None  # where card links point; default the publish endpoint ("" = site-relative)
    stream: str = "auto"  # GPTQ/AWQ layer by layer from the checkpoint: auto (when the model does not fit), always, never
    verbose: bool = False


def prepare(model: str, work: str) -> str:
    """The checkpoint directory of ``model``: a local path as is, a hub repo downloaded into the work dir.

    The download goes to ``WORK/sources/<name>`` so every node of a cluster (which shares the work
    dir) reads the same files, and a re-run finds them there.
    """
    path = Path(model)
    if path.is_dir():
        return str(path.resolve())
    from huggingface_hub import snapshot_download

    target = Path(work) / "sources" / naming.model_basename(model)
    progress.report(None, "downloading")
    snapshot_download(model, local_dir=target, allow_patterns=SOURCE_PATTERNS)
    return str(target)


def build_group(out: str, source: str, variants: list[str], options: RunOptions,
                stream: bool = False) -> dict[str, dict[str, str] | None]:
    """Build ``variants`` (one quantize stage) from the plan in ``out``; returns for each variant None when it
    was built and validated, else ``{"error": ..., "ending": "failed" | "crashed" | "interrupted"}``.

    ``stream``: the driver found that the model does not fit this stage's memory whole.
    """
    from quantpub.build import build_plan
    from quantpub.plan import load_plan

    outcomes = build_plan(load_plan(out), out, only=variants, device=options.device, source=source, stream=stream)
    return {o.variant: None if o.error is None else {"error": o.error, "ending": o.ending} for o in outcomes}


def evaluate(source: str, out: str, options: RunOptions) -> dict[str, dict[str, str] | None]:
    """Measure every built variant that has no evaluation yet, on the plan's held-out text (each manifest gets
    its ``evaluation``); returns for each variant None, or ``{"error": ..., "ending": ...}`` when loading it
    crashed or was killed."""
    from quantpub.build import resolve_device
    from quantpub.evaluate import evaluate as measure

    from quantpub.evaluate import Failed

    results = measure(out, model=source, context=options.context, windows=options.windows,
                      device=resolve_device(options.device))
    return {v: {"error": r.error, "ending": r.ending} if isinstance(r, Failed) else None for v, r in results.items()}


def publish(out: str, endpoint: str, token: str | None, variants: list[str], options: RunOptions) -> list:
    """Render the cards, then push ``variants``; returns a ``publish.Published`` per variant (repo, branch,
    commit, changed)."""
    from quantpub.card import render_run
    from quantpub.publish import publish as push

    if _loopback(endpoint):  # offline mode keeps a machine off the internet, not off its own hub
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = False
    progress.report(None, "carding")
    render_run(out, hub=endpoint if options.card_hub is None else options.card_hub, namespace=options.namespace)
    # every file was checked against its manifest when the run started (Driver._reconcile) or written by this run
    return push(out, endpoint=endpoint, token=token, namespace=options.namespace, only=variants, verify=False)


def _loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
