"""Task losses, with the switch that reproduces the original MAML code's inner-loss scale.

The original TensorFlow code sums per-example cross-entropy over a task's support set and
divides by the number of shots: that is the mean loss times the number of classes N. So its
alpha=0.4 on 5-way Omniglot equals alpha=2.0 on PyTorch's mean-reduced loss.
``reduction="sum_over_classes"`` gives that scale, ``"mean"`` gives PyTorch's.

The built-in losses check their shapes first: ``F.mse_loss`` broadcasts a ``[Q]`` target against
a ``[Q, 1]`` prediction into a ``[Q, Q]`` error (a wrong loss with only a warning), and the core
calls the losses under ``vmap``, where torch's own messages name no task or example. The shapes
are static, so the checks are plain Python comparisons: free in the hot loop, valid under
``vmap`` (they see one task's shapes) and ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum_over_classes"]
LossName = Literal["mse", "cross_entropy"]


def mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, as the paper's sinusoid experiment."""
    if prediction.shape != target.shape:
        _mse_shape_error(prediction, target)
    return F.mse_loss(prediction, target)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over examples (PyTorch's convention)."""
    _check_classification(logits, target)
    return F.cross_entropy(logits, target)


def cross_entropy_sum_over_classes(logits: Tensor, target: Tensor) -> Tensor:
    """The original code's scale: mean cross-entropy times the number of classes."""
    _check_classification(logits, target)
    return F.cross_entropy(logits, target) * logits.shape[-1]


_PER_TASK = "(shapes of one task, without the task dimension T)"


def _mse_shape_error(prediction: Tensor, target: Tensor) -> None:
    """Raise the mismatch with the reshape that fixes it."""
    p, t = list(prediction.shape), list(target.shape)
    if prediction.numel() == target.numel():
        fix = f"reshape the targets to {p} per task, i.e. [T, {', '.join(map(str, p))}] in an Episode"
        if p == [*t, 1]:
            fix += " (y.unsqueeze(-1))"
    else:
        fix = f"make the model output {p[1:]} per example to match the targets, or give targets of shape {p}"
    raise ValueError(
        f"mse loss: predictions have shape {p} but targets {t} {_PER_TASK}; torch would broadcast them "
        f"and average the wrong pairs. They must have identical shapes: {fix}"
    )


def _check_classification(logits: Tensor, target: Tensor) -> None:
    """Logits ``[n, C]`` and integer class indices ``[n]``, else an error naming both shapes."""
    if logits.dim() != 2:
        raise ValueError(
            f"cross_entropy loss: logits must be [examples, classes] per task, got shape {list(logits.shape)} "
            f"{_PER_TASK}; make the model return one row of class scores per example"
        )
    if target.dtype not in (torch.long, torch.uint8):
        raise ValueError(
            f"cross_entropy loss: targets must be integer class indices (torch.long), got {target.dtype} "
            f"with shape {list(target.shape)}; convert them (y.long()), or pass loss=<callable> for soft labels"
        )
    if target.shape != logits.shape[:1]:
        n = logits.shape[0]
        fix = f"reshape the targets to [{n}] per task, i.e. [T, {n}] in an Episode"
        if list(target.shape) == [n, 1]:
            fix += " (y.squeeze(-1))"
        raise ValueError(
            f"cross_entropy loss: logits have shape {list(logits.shape)} but targets {list(target.shape)} "
            f"{_PER_TASK}; targets must be one class index per example: {fix}"
        )


def make_loss(name: LossName, reduction: Reduction = "mean") -> Callable[[Tensor, Tensor], Tensor]:
    """Look up a task loss by name; unknown names are an error that lists the choices."""
    if reduction not in ("mean", "sum_over_classes"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'sum_over_classes'")
    if name == "mse":
        # Regression has one output: summing over "classes" is the mean, as in the original code.
        return mse
    if name == "cross_entropy":
        return cross_entropy if reduction == "mean" else cross_entropy_sum_over_classes
    raise ValueError(f"unknown loss {name!r}; use 'mse' or 'cross_entropy'")
