"""``quantpub run``: plan -> quantize (GPTQ, AWQ, GGUF) -> validate -> evaluate -> card -> publish.

Resumable: the ledger (SQLite, in the work dir) records every (model, variant); a re-run checks
finished variants against the sha256 in their manifests, rebuilds what is missing or changed,
retries failures up to ``max_attempts``, and publishes idempotently (an unchanged variant makes
no commit). Quantization runs in worker processes: locally, the GPU group (GPTQ, AWQ) and the
GGUF group run side by side in two processes; with ``executor="ray"`` they are Ray tasks (one
GPU each for GPTQ/AWQ when there is a GPU, CPU-only for GGUF) on a local or existing cluster.
The driver alone writes the ledger.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from quantpub.artifacts import MANIFEST, sha256_file
from quantpub.errors import PlanError, QuantpubError
from quantpub.ledger import Ledger

log = logging.getLogger(__name__)
LEDGER = "ledger.sqlite3"
DONE = ("validated", "evaluated", "carded", "published")


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
    context: int = 512
    windows: int = 8
    executor: str = "local"
    ray_address: str | None = None
    card_hub: str | None = None  # where card links point; default the publish endpoint ("" = site-relative)


def quantize_group(matrix: str, model: str, out: str, only: list[str], options: RunOptions,
                   group: str = "worker") -> list[tuple]:
    """One worker process: build ``only`` (variants of one group). Returns (variant, error) pairs.

    Logs go to the console and to ``OUT/logs/<group>.log``.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (Path(out) / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(out) / "logs" / f"{group}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    from quantpub.worker import quantize

    outcomes = quantize(matrix, model, out, only=only, calibration_file=options.calibration_file,
                        device=options.device, n_samples=options.n_samples, seq_len=options.seq_len)
    return [(o.variant, o.error) for o in outcomes]


def run(matrix: str | Path, models: list[str], work: str | Path, *, publish_to: str | None = None,
        options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Run every stage for every model; returns where things went (hub URL, ledger path, repos).

    With no ``publish_to`` the built-in hub serves ``WORK/hub`` on 127.0.0.1 for the run.
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(work / LEDGER)
    server = None
    token = options.token
    endpoint = publish_to
    if publish_to is None:
        server, endpoint, hub_token = embedded_hub(work)
        token = token or hub_token
        options = replace(options, card_hub="" if options.card_hub is None else options.card_hub)
    summary: dict[str, Any] = {"endpoint": endpoint, "ledger": str(ledger.path), "repos": [], "failed": []}
    try:
        for model in models:
            result = run_model(str(matrix), model, work, ledger, endpoint, token, options)
            summary["repos"] += result["repos"]
            summary["failed"] += result["failed"]
    finally:
        ledger.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    return summary


def embedded_hub(work: Path, port: int = 0):
    """The built-in hub on 127.0.0.1 over ``WORK/hub``: (server, url, write token)."""
    from quantpub.hub import HubConfig, load_or_create_users, start_in_thread

    users, _ = load_or_create_users(work / "hub")  # its generated user is the hub's admin: any namespace
    server, _ = start_in_thread(HubConfig(work / "hub", users=users), port=port)
    log.info("publishing to the built-in hub at %s (data in %s)", server.url, work / "hub")
    return server, server.url, users.write_token()


def run_model(matrix: str, model: str, work: Path, ledger: Ledger, endpoint: str, token: str | None,
              options: RunOptions) -> dict[str, Any]:
    from quantpub import naming
    from quantpub.plan import make_plan

    started = time.monotonic()
    device = options.device
    plan = make_plan(matrix, model, device="cpu" if device == "cpu" else "cuda")
    if plan.problems:
        raise PlanError(model, list(plan.problems))
    out = work / naming.model_basename(model)
    out.mkdir(parents=True, exist_ok=True)
    for job in plan.jobs:
        ledger.plan(model, job.id, job.method, job.repo, job.target)
    _reconcile(ledger, model, out, plan.jobs)
    _check_disk(out, [j for j in plan.jobs if ledger.get(model, j.id).state not in DONE])

    for attempt in range(options.max_attempts):
        todo = [j for j in plan.jobs if ledger.get(model, j.id).state not in DONE
                and ledger.get(model, j.id).attempts < options.max_attempts]
        if not todo:
            break
        log.info("[quantize] %s: %d variants to build (attempt %d)", model, len(todo), attempt + 1)
        for job in todo:
            ledger.attempt(model, job.id)
        groups = {"gpu": [j.id for j in todo if j.method in ("gptq", "awq")],
                  "gguf": [j.id for j in todo if j.method == "gguf"]}
        for outcome_variant, error in _execute(matrix, model, out, {k: v for k, v in groups.items() if v}, options):
            _record_build(ledger, model, out, outcome_variant, error)

    built = [j for j in plan.jobs if ledger.get(model, j.id).state in DONE]
    if options.evaluate and built:
        _evaluate(ledger, model, out, options)
    if built:
        from quantpub.card import render_run

        render_run(out, hub=endpoint if options.card_hub is None else options.card_hub, namespace=options.namespace)
        for job in built:
            if ledger.get(model, job.id).state in ("validated", "evaluated"):
                ledger.advance(model, job.id, "carded")
        log.info("[card] %s: cards written to %s", model, out / "cards")
        _publish(ledger, model, out, endpoint, token, options)
    failed = [r.variant for r in ledger.rows(model) if r.state == "failed"]
    repos = sorted({r.repo if not options.namespace else f"{options.namespace}/{r.repo.split('/', 1)[1]}"
                    for r in ledger.rows(model) if r.state == "published"})
    log.info("[done] %s in %.1fs: %d published, %d failed", model, time.monotonic() - started,
             sum(r.state == "published" for r in ledger.rows(model)), len(failed))
    return {"repos": repos, "failed": failed}


def _reconcile(ledger: Ledger, model: str, out: Path, jobs) -> None:
    """Trust the files, checked by hash: a finished directory counts, a changed or missing one is rebuilt."""
    from quantpub.publish import local_files

    for job in jobs:
        row = ledger.get(model, job.id)
        manifest_path = out / job.id / MANIFEST
        ok = False
        if manifest_path.is_file():
            manifest = {**json.loads(manifest_path.read_text()), "dir": out / job.id}
            try:
                local_files(manifest, None)
                ok = True
            except QuantpubError as exc:
                log.warning("%s: %s; rebuilding it", job.id, exc)
                shutil.rmtree(out / job.id)
        if ok and row.state in ("planned", "failed"):
            _record_build(ledger, model, out, job.id, None)
        elif not ok and row.state in DONE:
            log.warning("%s: the ledger says %s but its files are gone; rebuilding it", job.id, row.state)
            ledger.advance(model, job.id, "planned")


def _check_disk(out: Path, jobs) -> None:
    need = int(sum(j.size for j in jobs) * 1.2)
    if any(j.method == "gguf" for j in jobs):
        need += max(j.size for j in jobs) * 4  # the 16-bit GGUF kept while its types are built
    free = shutil.disk_usage(out).free
    if need > free:
        raise QuantpubError(f"{out}: the variants still to build need about {need / 1e9:.1f} GB "
                            f"and only {free / 1e9:.1f} GB is free; free space or use another --work")


def _execute(matrix: str, model: str, out: Path, groups: dict[str, list[str]], options: RunOptions):
    """Yield (variant, error) as groups finish."""
    if options.executor == "ray":
        yield from _execute_ray(matrix, model, out, groups, options)
        return
    with ProcessPoolExecutor(max_workers=len(groups), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(quantize_group, matrix, model, str(out), ids, options, name): name
                   for name, ids in groups.items()}
        for future in as_completed(futures):  # the ledger hears of each group as soon as it is done
            name = futures[future]
            try:
                yield from future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed group fails its variants, not the run
                yield from [(v, f"{name} worker failed: {type(exc).__name__}: {exc}") for v in groups[name]]


def _execute_ray(matrix: str, model: str, out: Path, groups: dict[str, list[str]], options: RunOptions):
    import ray

    if not ray.is_initialized():
        ray.init(address=options.ray_address, log_to_driver=False, include_dashboard=False,
                 **({} if options.ray_address else {"num_cpus": _cpus()}))
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(quantize_group)
    refs = {}
    for name, ids in groups.items():
        if name == "gpu":
            opts = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        else:
            opts = {"num_cpus": 1, "num_gpus": 0}
        refs[name] = task.options(**opts, max_retries=0).remote(matrix, model, str(out), ids, options, name)
    pending = {ref: name for name, ref in refs.items()}
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready)
        try:
            yield from ray.get(ready)
        except Exception as exc:  # noqa: BLE001 - a lost task fails its variants, not the run
            yield from [(v, f"{name} Ray task failed: {type(exc).__name__}: {exc}") for v in groups[name]]


def _cpus() -> int:
    from quantpub.backends.gguf import cpu_count

    return max(2, cpu_count())


def _record_build(ledger: Ledger, model: str, out: Path, variant: str, error: str | None) -> None:
    if error:
        ledger.fail(model, variant, error)
        log.error("[quantize] %s: failed: %s", variant, error.splitlines()[0])
        return
    path = out / variant / MANIFEST
    manifest = json.loads(path.read_text())
    timings = {k: manifest[k] for k in ("quantize_seconds", "convert_seconds") if k in manifest}
    ledger.advance(model, variant, "validated", size=manifest["size"], manifest_sha256=sha256_file(path),
                   tools=manifest["tools"], timings=timings)


def _evaluate(ledger: Ledger, model: str, out: Path, options: RunOptions) -> None:
    from quantpub.evaluate import evaluate
    from quantpub.worker import resolve_device

    try:
        results = evaluate(out, model=model, eval_file=options.eval_file, context=options.context,
                           windows=options.windows, device=resolve_device(options.device))
    except QuantpubError as exc:  # e.g. offline without --eval-file: the cards show no quality column
        log.warning("[evaluate] skipped: %s", exc)
        return
    for row in ledger.rows(model):
        manifest_path = out / row.variant / MANIFEST
        if row.state == "validated" and manifest_path.is_file() and \
                json.loads(manifest_path.read_text()).get("evaluation"):
            ledger.advance(model, row.variant, "evaluated", manifest_sha256=sha256_file(manifest_path),
                           timings={"evaluate_seconds": results.get(row.variant, {}).get("seconds", 0)})


def _publish(ledger: Ledger, model: str, out: Path, endpoint: str, token: str | None, options: RunOptions) -> None:
    from quantpub.publish import publish

    carded = [r.variant for r in ledger.rows(model) if r.state in ("carded", "published")]
    if not carded:
        return
    for result in publish(out, endpoint=endpoint, token=token, namespace=options.namespace, only=carded):
        ledger.advance(model, result.variant, "published", commit_oid=result.commit)
        log.info("[publish] %s -> %s@%s %s", result.variant, result.repo, result.branch,
                 "new commit " + result.commit[:10] if result.changed else "unchanged")


def load_back(endpoint: str, repo: str, revision: str, prompt: str = "def main():") -> str:
    """What a user does: a fresh process with HF_ENDPOINT, from_pretrained(repo, revision=...), generate."""
    code = ("import sys, transformers as t; r, v, p = sys.argv[1:4]; "
            "m = t.AutoModelForCausalLM.from_pretrained(r, revision=v); tok = t.AutoTokenizer.from_pretrained(r, revision=v); "
            "ids = tok(p, return_tensors='pt').input_ids; "
            "print(tok.decode(m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]))")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    done = subprocess.run([sys.executable, "-c", code, repo, revision, prompt], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise QuantpubError(f"loading {repo}@{revision} back from {endpoint} failed: {done.stderr.strip()[-800:]}")
    return done.stdout.strip().splitlines()[-1]  # the decoded text (libraries print banners before it)
