"""What ``quantpub run`` shows and keeps around the run itself: the offline example's inputs, the libraries'
output captured while the preflight loads them, the driver's log file, and the summary printed at the end."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("quantpub")
terminal = None  # the real stderr once the run has pointed fd 2 at its log (``log_to_file``)


def print_summary(work: Path, models: list[str], summary, publish_to: str | None, namespace: str | None) -> None:
    from rich.console import Console

    from quantpub.console import summary_lines, summary_table
    from quantpub.ledger import Ledger

    ledger = Ledger(Path(summary.ledger))
    try:
        rows = [r for r in ledger.rows() if r.model in models]
    finally:
        ledger.close()
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)
    out.print(summary_table(rows))
    for line in summary_lines(rows, publish_to, namespace, summary.stage_errors):
        out.print(line)
    out.print(f"done in {summary.seconds:.0f}s; logs under {work}/*/logs; `quantpub status --work {work}`")


def load_example_back(work: Path, model: str, summary) -> None:
    """The example ends as a user would: the GPTQ branch downloaded by revision from the hub, and generating."""
    from quantpub.run import embedded_hub, load_back

    gptq = next((r for r in summary.repos if r.endswith("-GPTQ")), None)
    if gptq is None:
        return
    branch = _first_branch(work, model)
    server, url, _ = embedded_hub(work)
    try:
        print(f"from_pretrained('{gptq}', revision='{branch}') through the hub, then generate:")
        print("  " + load_back(url, gptq, branch).replace("\n", "\n  "))
    finally:
        server.shutdown()
        server.server_close()
    print(f"serve the repos again: quantpub hub serve --data-dir {work / 'hub'} --port 8765, "
          "then use them with HF_ENDPOINT=http://127.0.0.1:8765")


class Captured:
    """Everything written to this process's stdout and stderr (C code included) goes to a temporary file."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.file = None

    def __enter__(self) -> Captured:
        if self.verbose:
            return self
        import tempfile

        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(1), os.dup(2)
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in zip((1, 2), self.saved):
                os.dup2(saved, fd)
                os.close(saved)

    def text(self) -> str:
        if self.file is None:
            return ""
        self.file.seek(0)
        return self.file.read().decode("utf-8", "replace")


def log_to_file(work: Path, verbose: bool, console, earlier: str = "") -> None:
    """The driver's log and every stray library line go to WORK/logs/run.log; the console shows
    quantpub's warnings and errors (everything with -v)."""
    from quantpub.console import LiveConsole
    from quantpub.executors.child import log_only_to

    (work / "logs").mkdir(parents=True, exist_ok=True)
    log_path = work / "logs" / "run.log"
    with log_path.open("a") as fh:
        fh.write(f"===== quantpub run, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n{earlier}")
    screen_stream = sys.stderr
    if not verbose:  # from here on, fd 2 is the log; the console keeps a copy of the real stderr
        screen_stream = os.fdopen(os.dup(2), "w", buffering=1)
        sys.stderr.flush()
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 2)
        os.close(fd)
        global terminal
        terminal = screen_stream  # quantpub's own messages (and a bug's traceback) still reach the terminal
    root = log_only_to(logging.FileHandler(log_path))
    if isinstance(console, LiveConsole):
        from rich.logging import RichHandler

        screen: logging.Handler = RichHandler(console=console.live.console, show_time=False, show_path=False)
    else:
        screen = logging.StreamHandler(screen_stream)
        screen.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    screen.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        screen.addFilter(lambda record: record.name.startswith("quantpub"))
    root.addHandler(screen)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)


def _first_branch(work: Path, model: str) -> str:
    from quantpub.ledger import Ledger

    ledger = Ledger(work / "ledger.sqlite3")
    try:
        rows = [r for r in ledger.rows(model) if r.method == "gptq" and r.state == "published"]
    finally:
        ledger.close()
    return next((r.target for r in rows if r.target != "main"), rows[0].target if rows else "main")


def example(work: Path, options):
    """The offline example: a tiny llama built here, calibrated and evaluated on local text."""
    from dataclasses import replace

    from quantpub.tiny import build_tiny_model, corpus_text

    data = work / "example"
    model = data / "tiny-llama"
    calib, held_out = data / "calibration.txt", data / "held-out.txt"
    if not (model / "config.json").is_file():
        text = corpus_text()
        cut = int(len(text) * 0.8)
        data.mkdir(parents=True, exist_ok=True)
        calib.write_text(text[:cut])
        held_out.write_text(text[cut:])
        build_tiny_model(model, "llama", text=text[:cut])
    log.info("example: tiny llama %s, calibration %s, held-out %s", model, calib, held_out)
    return [str(model)], replace(options, calibration_file=options.calibration_file or str(calib),
                                 eval_file=options.eval_file or str(held_out), device="cpu",
                                 n_samples=options.n_samples or 16, seq_len=options.seq_len or 256,
                                 context=min(options.context or 256, 256), windows=min(options.windows or 8, 8))
