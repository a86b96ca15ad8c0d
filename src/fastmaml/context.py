"""Which point of the inner-loop trajectory a forward pass belongs to.

Most layers ignore it. Layers whose weights depend on the inner step (MAML++'s per-step
BatchNorm) read it. The core sets it explicitly around every forward of the inner loop, so
models stay plain ``nn.Module``s with the usual ``forward(x)``, and a recomputation (gradient
checkpointing) that re-runs the step function sets it again.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_STEP: contextvars.ContextVar[int] = contextvars.ContextVar("fastmaml_inner_step", default=0)


def current_step() -> int:
    """The trajectory index of the parameters being evaluated (0 = before any update)."""
    return _STEP.get()


@contextlib.contextmanager
def at_step(step: int) -> Iterator[None]:
    """Mark forwards inside the block as evaluated at trajectory point ``step``."""
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)
