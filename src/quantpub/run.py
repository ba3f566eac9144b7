"""``quantpub run``: preflight, then every model's stages through the scheduler, then a summary.

    preflight -> lock the work dir -> ledger -> per model: prepare, quantize (GPTQ/AWQ group on a
    GPU slot, GGUF group on CPU cores), evaluate, card + publish -> summary

Many models are in flight at once (the scheduler); each stage runs in its own worker process or
Ray task. Resumable: the ledger records every variant and stage; a re-run checks finished
variants against the sha256 in their manifests, rebuilds what is missing or changed, retries
failed variants up to ``max_attempts`` (kills and lost workers do not count), and publishes
idempotently. Only this driver writes the ledger.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from quantpub import preflight
from quantpub.driver import Driver, Summary
from quantpub.errors import QuantpubError
from quantpub.ledger import Ledger
from quantpub.scheduler import Capacity, Scheduler
from quantpub.stages import RunOptions
from quantpub.workdir import WorkLock

log = logging.getLogger(__name__)
LEDGER = "ledger.sqlite3"
__all__ = ["RunOptions", "run", "check", "embedded_hub", "load_back", "LEDGER", "Summary"]


def check(matrix: str | Path, models: list[str], work: str | Path, *, publish_to: str | None = None,
          options: RunOptions = RunOptions()) -> preflight.Checked:
    """The preflight of a run: plans (keyed by ``local_ids(models)``), or every problem found. Creates nothing."""
    options = _absolute_paths(options)
    inputs = preflight.Inputs(
        matrix=Path(matrix), models=local_ids(models), work=Path(work), calibration_file=options.calibration_file,
        eval_file=options.eval_file, evaluate=options.evaluate, publish_to=publish_to, token=options.token,
        namespace=options.namespace, device="cpu" if options.device == "cpu" else options.device,
        n_samples=options.n_samples, seq_len=options.seq_len, context=options.context, windows=options.windows)
    return preflight.check(inputs)


def run(matrix: str | Path, models: list[str], work: str | Path, *, publish_to: str | None = None,
        options: RunOptions = RunOptions(), observer=None, checked: preflight.Checked | None = None) -> Summary:
    """Run every stage for every model; returns where things went and what failed.

    With no ``publish_to`` the built-in hub serves ``WORK/hub`` on 127.0.0.1 for the run.

    Raises:
        PreflightError: a problem with the input; nothing was created.
        QuantpubError: the work dir is in use by another run, or cannot be written.
    """
    matrix = Path(matrix).resolve()
    work = Path(work).resolve()
    models = local_ids(models)
    options = _absolute_paths(options)  # stages run in their own working directories
    slot_device = "cuda" if options.device.startswith("cuda:") else options.device
    checked = checked or check(matrix, models, work, publish_to=publish_to, options=options)
    if checked.problems:
        raise preflight.PreflightError(checked.problems)
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    with WorkLock(work):
        ledger = Ledger(work / LEDGER)
        server, endpoint, token = None, publish_to, options.token
        try:
            if publish_to is None:
                server, endpoint, hub_token = embedded_hub(work)
                token = token or hub_token
                options = replace(options, card_hub="" if options.card_hub is None else options.card_hub)
            executor, capacity = make_executor(options, work)
            # a stage on a GPU slot sees that one GPU (CUDA_VISIBLE_DEVICES) as cuda:0
            options = replace(options, device=slot_device)
            run_id = ledger.start_run(executor.name, os.getpid())
            driver = Driver(work, ledger, run_id, checked.plans, endpoint, token, options, observer)
            scheduler = Scheduler(executor, ledger, run_id, driver, capacity, window=options.models_in_flight,
                                  on_tick=observer.tick if observer else None)
            driver.scheduler = scheduler
            try:
                driver.plan_all(models)
                scheduler.run()
            finally:
                executor.shutdown()
                if observer:
                    observer.finish()
            summary = driver.summary(time.monotonic() - started)
            ledger.end_run(run_id, 0 if summary.ok else 1)
            return summary
        finally:
            ledger.close()
            if server is not None:
                server.shutdown()
                server.server_close()


def _absolute_paths(options: RunOptions) -> RunOptions:
    return replace(options, **{k: os.path.abspath(v) for k in ("calibration_file", "eval_file")
                               if (v := getattr(options, k))})


def local_ids(models: list[str]) -> list[str]:
    """Local checkpoints by absolute path (so the ledger knows them from any directory), hub ids as given."""
    return [str(Path(m).resolve()) if Path(m).is_dir() else m for m in models]


def make_executor(options: RunOptions, work: Path):
    """The executor and what the scheduler may hand out on it."""
    from quantpub.machine import cpu_count, total_memory

    cores = cpu_count()
    if options.executor == "ray":
        from quantpub.executors.ray import RayExecutor

        executor = RayExecutor(options.ray_address, gpu_slots=options.slots, cpus=max(2, cores),
                               verbose=options.verbose, env=_forwarded_env())
        gpus = executor.cluster_gpus()
        return executor, Capacity(gpu=gpus or options.slots or 1, cpus=None, memory=None, net=4)
    from quantpub.executors.local import LocalExecutor

    slots = _gpu_slots(options)
    memory = int(total_memory() * 0.9)
    return LocalExecutor(slots, verbose=options.verbose), Capacity(gpu=len(slots), cpus=cores + len(slots),
                                                                   memory=memory, net=2)


def _gpu_slots(options: RunOptions) -> list[str | None]:
    """The visible GPUs (one slot each), or ``options.slots`` CPU slots where there is none."""
    if options.device != "cpu":
        import torch

        if torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else \
                [str(i) for i in range(torch.cuda.device_count())]
            if options.device.startswith("cuda:"):  # one named GPU: the only slot
                return [ids[int(options.device.split(":", 1)[1])]]
            return ids[: options.slots] if options.slots else ids
    return [None] * (options.slots or 1)


def _forwarded_env() -> dict[str, str]:
    """What Ray workers started elsewhere must see as the driver does (hub endpoint, offline mode, caches)."""
    keep = ("HF_", "TRANSFORMERS_", "QUANTPUB_", "HUGGINGFACE_", "GPTQMODEL_", "XDG_CACHE_HOME", "PYTHONPATH")
    return {k: v for k, v in os.environ.items() if k.startswith(keep)}


def embedded_hub(work: Path, port: int = 0):
    """The built-in hub on 127.0.0.1 over ``WORK/hub``: (server, url, write token)."""
    from quantpub.hub import HubConfig, load_or_create_users, start_in_thread

    users, _ = load_or_create_users(work / "hub")  # its generated user is the hub's admin: any namespace
    server, _ = start_in_thread(HubConfig(work / "hub", users=users), port=port)
    log.info("publishing to the built-in hub at %s (data in %s)", server.url, work / "hub")
    return server, server.url, users.write_token()


def load_back(endpoint: str, repo: str, revision: str, prompt: str = "def main():") -> str:
    """What a user does: a fresh process with HF_ENDPOINT, from_pretrained(repo, revision=...), generate."""
    code = ("import sys, transformers as t; r, v, p = sys.argv[1:4]; t.logging.set_verbosity_error(); "
            "m = t.AutoModelForCausalLM.from_pretrained(r, revision=v); tok = t.AutoTokenizer.from_pretrained(r, revision=v); "
            "ids = tok(p, return_tensors='pt').input_ids; "
            "print(tok.decode(m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]))")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run([sys.executable, "-c", code, repo, revision, prompt], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise QuantpubError(f"loading {repo}@{revision} back from {endpoint} failed: {done.stderr.strip()[-800:]}")
    return done.stdout.strip().splitlines()[-1]  # the decoded text (libraries print banners before it)
