"""Task losses, with the switch that reproduces the original MAML code's inner-loss scale.

The original TensorFlow code sums per-example cross-entropy over a task's support set and
divides by the number of shots: that is the mean loss times the number of classes N. So its
alpha=0.4 on 5-way Omniglot equals alpha=2.0 on PyTorch's mean-reduced loss.
``reduction="sum_over_classes"`` gives that scale, ``"mean"`` gives PyTorch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum_over_classes"]
LossName = Literal["mse", "cross_entropy"]


def mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, as the paper's sinusoid experiment."""
    return F.mse_loss(prediction, target)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over examples (PyTorch's convention)."""
    return F.cross_entropy(logits, target)


def cross_entropy_sum_over_classes(logits: Tensor, target: Tensor) -> Tensor:
    """The original code's scale: mean cross-entropy times the number of classes."""
    return F.cross_entropy(logits, target) * logits.shape[-1]


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
