"""What runs inside a worker (a local process or a Ray task) around a stage function.

Every library's output (print, warnings, logging, C code writing to fd 1 and 2) goes to the
stage's log file under the work dir, the working directory is the stage's log folder (GPTQModel
writes ``logs/`` into the current directory), and progress events go back to the driver.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from quantpub import progress

LIBRARY_LOGGERS = ("transformers", "gptqmodel", "torch", "httpx", "httpx2", "huggingface_hub", "datasets", "ray",
                   "accelerate", "optimum", "urllib3", "filelock")


def where(gpu_slot: str | None = None) -> dict[str, Any]:
    """The node, GPU and pid this worker runs on (for the ledger)."""
    gpu = gpu_slot
    if gpu is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpu = visible if visible not in (None, "") else None
    return {"node": os.environ.get("QUANTPUB_NODE") or socket.gethostname(), "gpu": gpu, "pid": os.getpid()}


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TRY_HEADER = "====="  # starts the line each try of a stage writes first into its (appended) log


def log_only_to(handler: logging.Handler) -> logging.Logger:
    """The root logger, with ``handler`` (formatted for a log file) as its only handler."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    return root


def capture_output(log_file: str | Path, verbose: bool = False) -> None:
    """Send this process's stdout, stderr, warnings and logging to ``log_file`` (and the console with ``verbose``)."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - lives as long as the process
    handle.write(f"\n{TRY_HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {socket.gethostname()} "
                 "=====\n")
    if not verbose:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        sys.stdout = sys.stderr = handle
    root = log_only_to(logging.StreamHandler(handle))
    if verbose:
        root.addHandler(logging.StreamHandler(sys.__stderr__))
    root.setLevel(logging.INFO)
    for name in LIBRARY_LOGGERS:  # libraries that attach their own console handlers
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            if not verbose:
                lib.removeHandler(h)
        lib.propagate = True
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would only fill the log
    os.chdir(path.parent)


def watch_parent(parent: int) -> None:
    """Exit when the driver that started this process is gone (it was killed): no orphan keeps building."""
    def loop():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(1)

    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def run_stage(fn: Callable[..., Any], args: tuple, send: Callable[[str, Any], None], *, log_file: str,
              model: str, stage: str, verbose: bool = False, gpu_slot: str | None = None,
              workdir: tuple[str, str] | None = None) -> Any:
    """Run one stage function with output captured and progress forwarded; returns its result."""
    if workdir is not None:  # before the log (which lives in the work dir) is opened
        from quantpub.workdir import check_shared

        check_shared(*workdir)
    capture_output(log_file, verbose)
    faulthandler.enable(all_threads=True)  # a crash signal writes its name and the stacks into the log
    send("placed", where(gpu_slot))
    progress.install(lambda event: send("event", event), model=model, stage=stage)
    logging.getLogger("quantpub").info("stage %s of %s starts", stage, model)
    try:
        return fn(*args)
    finally:
        progress.install(None)
