"""Native code on one variant runs in a process of its own: a crash costs that variant, not the stage.

llama.cpp (quantize, load, evaluate, the 16-bit reference), the importance matrix's forward
passes and every load of a built GPTQ/AWQ variant (validation, the runtime probes, evaluation)
go through ``Isolated``: a small pool of spawned worker processes (pebble's ``ProcessPool``),
kept for the whole stage so libraries are imported once. When native code kills its process
(SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) the call raises ``Crashed`` naming the signal, the
phase and the last lines of that variant's log, and the pool starts a fresh worker for the next
call. A worker killed from outside (SIGKILL, SIGTERM, the OOM killer) raises ``Killed``: an
interruption, not the variant's fault.

Each call writes its output (stdout, stderr, logging, and at a crash faulthandler's traceback)
to the variant's own log, ``LOG_DIR/<variant>.log``.

``QUANTPUB_TEST_CRASH=PHASE:VARIANT[:SIGNAL],...`` makes a matching call (or ``maybe_crash``
point) kill its own process with that signal (SIGSEGV by default): how the tests inject a
native crash into a real run.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from quantpub import machine
from quantpub.errors import QuantpubError

log = logging.getLogger(__name__)
TEST_CRASH = "QUANTPUB_TEST_CRASH"
TAIL_LINES = 40
T = TypeVar("T")


class Ended(QuantpubError):
    """The process running a call on ``variant`` ended without an answer."""

    kind = "lost"

    def __init__(self, variant: str, phase: str, reason: str, log_file: Path | None, tail: str = ""):
        self.variant, self.phase, self.reason, self.log_file, self.tail = variant, phase, reason, log_file, tail
        last = last_words(tail)
        super().__init__(f"{reason} during {phase} of {variant}" + (f" (log: {log_file})" if log_file else "")
                         + (f": {last}" if last else ""))

    def __reduce__(self):
        return type(self), (self.variant, self.phase, self.reason, self.log_file, self.tail)

    @property
    def signature(self) -> str:
        """What makes two crashes the same crash: the signal and the phase (not the log or the time)."""
        return f"{self.reason} during {self.phase}"


class Crashed(Ended):
    """Native code killed its own process: the variant's failure (one attempt)."""

    kind = "crashed"


class Killed(Ended):
    """The process was killed from outside: an interruption, retried."""

    kind = "interrupted"


def maybe_crash(phase: str, variant: str) -> None:
    """Kill this process as native code would when ``QUANTPUB_TEST_CRASH`` names this point (tests only)."""
    for entry in filter(None, os.environ.get(TEST_CRASH, "").split(",")):
        parts = entry.strip().split(":")
        if len(parts) >= 2 and parts[0] == phase and parts[1] in (variant, "*"):
            signum = signal.Signals[parts[2]] if len(parts) > 2 else signal.SIGSEGV
            logging.getLogger(__name__).error("%s=%s: killing this process with %s", TEST_CRASH, entry, signum.name)
            logging.shutdown()
            os.kill(os.getpid(), signum)


def last_words(text: str) -> str:
    """The line of a log's tail that says most about how it ended: faulthandler's fatal error with the
    innermost Python frame (``Fatal Python error: Segmentation fault in decode (_internals.py:321)``), else
    the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Fatal Python error: "):
            after = lines[i + 1:]
            current = next((j for j, line in enumerate(after) if line.startswith("Current thread")), 0)
            frame = next((line for line in after[current:] if line.startswith("File ")), "")
            where = ""
            if frame:  # File "/path/x.py", line 81 in maybe_crash
                path, _, rest = frame.removeprefix('File "').partition('", line ')
                number, _, function = rest.partition(" in ")
                where = f" in {function} ({Path(path).name}:{number})"
            return (lines[i] + where)[:300]
    meaningful = [line for line in lines if not line.startswith("Extension modules:")]
    return meaningful[-1][:300] if meaningful else ""


def tail(path: Path | None, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    if path is None or not Path(path).is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 16384))
        return b"\n".join(fh.read().splitlines()[-lines:]).decode(errors="replace")


# faulthandler's words for the crash signals ("Fatal Python error: Segmentation fault")
FATAL_ERRORS = {"Segmentation fault": "SIGSEGV", "Bus error": "SIGBUS", "Illegal instruction": "SIGILL",
                "Floating-point exception": "SIGFPE", "Floating point exception": "SIGFPE", "Aborted": "SIGABRT"}


def crash_in_log(path: Path | None, since: str = "") -> str | None:
    """The crash signal faulthandler wrote into a log (after the last line starting with ``since``), or None.

    For workers whose exit status is not known here (a Ray task's process): faulthandler is on
    in every stage process and writes the signal's name before the process dies.
    """
    text = tail(path, 4000)
    if since and since in text:
        text = text.rsplit(since, 1)[1]
    for line in reversed(text.splitlines()):
        if line.startswith("Fatal Python error: "):
            return FATAL_ERRORS.get(line.removeprefix("Fatal Python error: ").strip())
    return None


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """fd 1 and 2, Python's streams, logging and faulthandler into ``path`` for the body; restored after."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    root = logging.getLogger()
    handler = logging.StreamHandler(handle)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_handlers, old_level = root.handlers[:], root.level
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    sys.stdout = sys.stderr = handle
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    faulthandler.enable(handle, all_threads=True)
    try:
        yield
    finally:
        faulthandler.disable()
        root.handlers, root.level = old_handlers, old_level
        sys.stdout, sys.stderr = streams
        handle.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        handle.close()


def _call(log_file: str, phase: str, variant: str, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    """What a pool worker runs: the call, its output in the variant's log."""
    with _output_to(Path(log_file)):
        logging.getLogger(__name__).info("%s %s: %s (pid %d)", phase, variant, getattr(fn, "__qualname__", fn),
                                         os.getpid())
        maybe_crash(phase, variant)
        return fn(*args, **kwargs)


def _preload(modules: tuple[str, ...]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def _noop() -> None:
    return None


class Isolated:
    """A pool of ``workers`` spawned processes for native calls on variants; use as a context manager.

    ``preload``: modules each worker imports when it starts (started at once, in the background,
    so their import overlaps the stage's own work).
    """

    def __init__(self, log_dir: str | Path, workers: int = 1, preload: tuple[str, ...] = ()):
        from pebble import ProcessPool

        self.log_dir = Path(log_dir).resolve()
        self.pool = ProcessPool(max_workers=max(1, workers), context=multiprocessing.get_context("spawn"),
                                initializer=_preload, initargs=(tuple(preload),))
        self.oom_before = machine.oom_kills()
        self.peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True, name="quantpub-isolated-peak")
        self._sampler.start()
        for _ in range(max(1, workers)):
            self.pool.schedule(_noop)  # start the workers now; they import ``preload`` meanwhile

    def log_file(self, variant: str) -> Path:
        return self.log_dir / f"{variant}.log"

    def call(self, variant: str, phase: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker; its exception is re-raised here.

        Raises:
            Crashed: native code killed the worker (a crash signal).
            Killed: the worker was killed from outside.
        """
        from pebble.common import ProcessExpired

        log_file = self.log_file(variant)
        future = self.pool.schedule(_call, args=(str(log_file), phase, variant, fn, args, kwargs))
        try:
            return future.result()
        except ProcessExpired as exc:
            end = machine.ending(exc.exitcode, peak=self.peak or None, oom_before=self.oom_before)
            error = (Crashed if end.kind == "crashed" else Killed)(variant, phase, end.reason, log_file, tail(log_file))
            log.error("%s", error)
            raise error from None

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, machine.tree_rss(os.getpid()))

    def close(self) -> None:
        self._stop.set()
        self.pool.close()
        self.pool.join()

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.pool.stop()
        self.close()
