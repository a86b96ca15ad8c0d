"""Trust-region pieces for the outer step: conjugate gradient and the backtracking line search.

Pure functions over flat vectors and callables, so the meta-RL step can plug in any
Fisher-vector product (exact double backward through the inner step, finite differences as the
original code, or first order) and any surrogate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmaml.rules import Params


def flatten(tensors: Params | list[Tensor]) -> Tensor:
    """Concatenate a dict's values (in its key order) or a list of tensors into one vector."""
    items = list(tensors.values()) if isinstance(tensors, dict) else tensors
    return torch.cat([t.reshape(-1) for t in items])


def unflatten(vector: Tensor, like: Params) -> Params:
    """Split ``vector`` back into tensors shaped like ``like`` (same key order)."""
    out, offset = {}, 0
    for name, ref in like.items():
        out[name] = vector[offset:offset + ref.numel()].view_as(ref)
        offset += ref.numel()
    return out


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite ``A`` given only ``A v``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iterations):
        if rr <= residual_tol:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@dataclass
class LineSearchResult:
    accepted: bool
    step_fraction: float
    loss: float
    kl: float
    backtracks: int


def backtracking_line_search(evaluate: Callable[[Tensor], tuple[float, float]], theta: Tensor, full_step: Tensor,
                             loss_before: float, max_kl: float, backtracks: int = 15,
                             ratio: float = 0.8) -> tuple[Tensor, LineSearchResult]:
    """Shrink the step by ``ratio`` until the surrogate loss improves and the mean KL is within
    ``max_kl`` (rllab's ConjugateGradientOptimizer); keep ``theta`` if no step qualifies."""
    fraction = 1.0
    loss, kl = float("nan"), float("nan")
    for k in range(backtracks):
        candidate = theta + fraction * full_step
        loss, kl = evaluate(candidate)
        if loss < loss_before and kl <= max_kl:
            return candidate, LineSearchResult(True, fraction, loss, kl, k)
        fraction *= ratio
    return theta, LineSearchResult(False, 0.0, loss, kl, backtracks)


def trust_region_step(gradient: Tensor, fvp: Callable[[Tensor], Tensor], max_kl: float, iterations: int = 10,
                      damping: float = 1e-5) -> Tensor:
    """The full TRPO step ``sqrt(2 delta / s^T F s) s`` with ``s = F^-1 g`` for a descent direction.

    ``gradient`` is of the loss to minimise; the returned step moves against it.
    """
    def damped(v: Tensor) -> Tensor:
        return fvp(v) + damping * v

    direction = conjugate_gradient(damped, gradient, iterations)
    shs = direction @ damped(direction)
    scale = torch.sqrt(2 * max_kl / (shs + 1e-8))
    return -scale * direction
