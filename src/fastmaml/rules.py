"""Inner-loop update rules: how one task's gradient turns parameters into adapted parameters.

A rule is a small object with ``init`` (its own meta-parameters, e.g. learned learning rates,
which the learner registers so the outer optimiser trains them) and a pure ``update``.
First order is a stop-gradient on the inner gradient inside the rule: the core never branches on
it, and the meta-gradient then equals the query gradient at the adapted parameters (FOMAML).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]


class InnerRule(Protocol):
    """``init(params) -> rule_params`` and ``update(params, grads, rule_params, step) -> params``."""

    first_order: bool

    def init(self, params: Params) -> Params: ...

    def update(self, params: Params, grads: Params, rule_params: Params, step: int) -> Params: ...


def _stop(grad: Tensor, first_order: bool) -> Tensor:
    return grad.detach() if first_order else grad


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent with a fixed step size, as in MAML."""

    lr: float
    first_order: bool = False

    def init(self, params: Params) -> Params:
        return {}

    def update(self, params: Params, grads: Params, rule_params: Params, step: int) -> Params:
        return {k: p - self.lr * _stop(grads[k], self.first_order) for k, p in params.items()}


@dataclass(frozen=True)
class PerParameterLR:
    """Meta-SGD (Li et al. 2017): a learned step size for every parameter element."""

    init_lr: float
    first_order: bool = False

    def init(self, params: Params) -> Params:
        return {k: torch.full_like(p, self.init_lr) for k, p in params.items()}

    def update(self, params: Params, grads: Params, rule_params: Params, step: int) -> Params:
        return {k: p - rule_params[k] * _stop(grads[k], self.first_order) for k, p in params.items()}


@dataclass(frozen=True)
class PerLayerPerStepLR:
    """MAML++'s LSLR (Antoniou et al. 2019): a learned step size per parameter tensor and step.

    Steps past ``steps`` (e.g. more steps at test time than in training) reuse the last rate.
    """

    init_lr: float
    steps: int
    first_order: bool = False

    def init(self, params: Params) -> Params:
        return {k: torch.full((self.steps,), self.init_lr, dtype=p.dtype, device=p.device) for k, p in params.items()}

    def update(self, params: Params, grads: Params, rule_params: Params, step: int) -> Params:
        index = min(step, self.steps - 1)
        return {k: p - rule_params[k][index] * _stop(grads[k], self.first_order) for k, p in params.items()}
