"""Where stages run: worker processes on this machine (``local``) or Ray tasks on a cluster (``ray``).

Both take the same ``Task`` and give back the same ``Message``s, so the scheduler does not know
which one it drives. A stage function is plain Python and knows nothing of either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Resources:
    """What a stage needs while it runs."""

    gpu: int = 0          # accelerator slots (a GPU, or a CPU slot on a machine without one)
    cpus: int = 1         # cores
    memory: int = 0       # host bytes at its peak, from the plan
    net: int = 0          # network slots (downloads, uploads)


@dataclass
class Task:
    id: int
    model: str
    stage: str                      # prepare, quantize-gpu, quantize-gguf, evaluate, publish
    fn: Callable[..., Any]          # a module-level function (it is pickled to the worker)
    args: tuple
    resources: Resources
    log: str                        # the stage's log file: every library's output goes there
    after: list[int] = field(default_factory=list)  # task ids this one waits for
    workdir: tuple[str, str] | None = None  # (work dir, its id): the worker checks it sees the driver's


@dataclass(frozen=True)
class Message:
    """From a running task: ``event`` (progress), ``placed`` (where it runs), ``result``, ``error``, or its
    worker gone without a result: ``crashed`` or ``lost`` (payload ``{"kind", "reason", "signal"}``: kind
    ``crashed``, ``killed`` from outside, or ``lost`` with no signal known)."""

    task: int
    kind: str
    payload: Any = None
