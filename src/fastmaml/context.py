"""Where a forward pass runs: which point of the inner-loop trajectory, under which transforms.

Most layers ignore the step. Layers whose weights depend on the inner step (MAML++'s per-step
BatchNorm) read it. The core sets it explicitly around every forward of the inner loop, so
models stay plain ``nn.Module``s with the usual ``forward(x)``, and a recomputation (gradient
checkpointing) that re-runs the step function sets it again.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

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


def _transform_keys() -> list | None:
    """The functorch transforms active now (outermost first), or ``None`` if unknowable (while
    ``torch.compile`` traces, or on a torch without the private stack API)."""
    if torch.compiler.is_compiling():
        return None
    get_stack = getattr(torch._C._functorch, "get_interpreter_stack", None)
    if get_stack is None:
        return None
    stack = get_stack()
    return [] if stack is None else [interpreter.key() for interpreter in stack]


def inside_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active at any level of the functorch transform stack.

    Also true when that cannot be known (see :func:`_transform_keys`): callers then take the path
    that is exact under ``vmap``.
    """
    keys = _transform_keys()
    vmap_key = getattr(getattr(torch._C._functorch, "TransformType", None), "Vmap", None)
    return keys is None or vmap_key is None or vmap_key in keys


def outside_transforms() -> bool:
    """Whether no functorch transform (``vmap``, ``grad``, ``jvp``, ...) is active, knowably."""
    return _transform_keys() == []
