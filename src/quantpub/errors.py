"""Typed errors. Each carries enough context (file, key, variant) for one clear line.

The CLI turns a ``QuantpubError`` into ``error: <message>`` and its ``exit_code``; anything
else is a bug and keeps its traceback (exit code 70).
"""

from __future__ import annotations

# exit codes of every quantpub command (README "Exit codes")
EXIT_OK = 0          # everything asked for was done (a run: every variant built and published)
EXIT_FAILED = 1      # the command ran to its end but some variants failed or crashed, or a stage failed
EXIT_INPUT = 2       # a problem with the input (matrix, model, data, options): nothing was built
EXIT_HUB = 3         # the hub refused, went away or could not be reached while publishing or downloading
EXIT_MACHINE = 4     # this machine: disk full, no permission, work dir or hub data dir in use, a tool missing
EXIT_BUG = 70        # a bug in quantpub (the traceback is printed; please report it)


class QuantpubError(Exception):
    """Base for every error a user can fix by changing their input."""

    exit_code = EXIT_INPUT


class MachineError(QuantpubError):
    """A problem of this machine, not of the input: a lock held by another process, a tool not installed."""

    exit_code = EXIT_MACHINE


class MatrixError(QuantpubError):
    """A matrix file that cannot be read or violates the schema.

    ``key`` is the dotted path to the offending entry (``gptq.product.bits``), ``line``
    the 1-based YAML line where it is known.
    """

    def __init__(self, path: str, message: str, *, key: str | None = None, line: int | None = None):
        self.path, self.key, self.line = str(path), key, line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class ModelError(QuantpubError):
    """A source model whose config cannot be found, read or is not supported."""

    def __init__(self, model: str, message: str):
        self.model = model
        super().__init__(f"model {model}: {message}")


class PlanError(QuantpubError):
    """The matrix and the model do not fit together (e.g. calibration longer than context)."""

    def __init__(self, model: str, problems: list[str]):
        self.model, self.problems = model, problems
        super().__init__(f"model {model}: " + "; ".join(problems))


class CalibrationError(QuantpubError):
    """Calibration text that cannot be loaded, or is too short for the requested samples."""

    def __init__(self, source: str, message: str, *, role: str = "calibration"):
        self.source, self.reason = source, message
        super().__init__(f"{role} data {source}: {message}")


class QuantizeError(QuantpubError):
    """A variant that failed to quantize, save or validate."""

    def __init__(self, variant: str, model: str, message: str):
        self.variant, self.model = variant, model
        super().__init__(f"variant {variant} of {model}: {message}")


class PublishError(QuantpubError):
    """A variant that cannot be published: bad input, changed files, or (``hub=True``) the hub's error."""

    def __init__(self, repo: str, branch: str | None, message: str, *, hub: bool = False):
        self.repo, self.branch = repo, branch
        self.exit_code = EXIT_HUB if hub else EXIT_INPUT
        super().__init__(f"{repo}@{branch}: {message}" if branch else f"{repo}: {message}")
