"""The pure functional core of MAML: inner-loop adaptation and the meta-objective.

Everything here is a function of parameter dicts (``torch.func`` style): dicts in, new dicts
out, nothing mutated, no I/O. A meta-batch is a leading task dimension that
:func:`meta_objective` either ``vmap``-s over (one batched pass, the fast path) or loops over
(the readable reference that tests compare against).

Second order comes for free: ``torch.func.grad`` inside the task function stays differentiable
for the outer ``backward``. First order is a stop-gradient inside the inner rule (see
:mod:`fastmaml.rules`), never a branch here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from fastmaml.rules import InnerRule, Params

ForwardFn = Callable[[Params, Params, Tensor], Tensor]
"""``forward(params, buffers, x) -> prediction`` for ONE task (no task dimension)."""
LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(prediction, target) -> scalar``."""
Strategy = Literal["vmap", "loop"]


def adapt(
    forward: ForwardFn,
    params: Params,
    buffers: Params,
    rule_params: Params,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn,
    rule: InnerRule,
    steps: int,
    fixed: Params | None = None,
) -> list[Params]:
    """Run ``steps`` inner updates on one task's support set; return the whole trajectory.

    The trajectory ``[theta_0, ..., theta_steps]`` lets callers score every step (evaluation
    curves, MAML++'s multi-step loss) from one inner loop. ``fixed`` parameters take part in the
    forward pass but are not adapted (ANIL's body); they still receive meta-gradients.
    """
    frozen = fixed or {}

    def support_loss(adapted: Params) -> Tensor:
        return loss_fn(forward({**frozen, **adapted}, buffers, x), y)

    support_grad = torch.func.grad(support_loss)
    trajectory = [params]
    for step in range(steps):
        params = rule.update(params, support_grad(params), rule_params, step)
        trajectory.append(params)
    return trajectory


def task_objective(
    forward: ForwardFn,
    params: Params,
    buffers: Params,
    rule_params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    inner_loss_fn: LossFn,
    outer_loss_fn: LossFn,
    rule: InnerRule,
    steps: int,
    step_weights: Sequence[float] | None = None,
    adapted_names: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Query loss of one task after adaptation; returns ``(loss, final query prediction)``.

    ``step_weights`` (length ``steps + 1``) gives MAML++'s multi-step loss
    ``sum_s w_s * L_query(theta_s)``; by default only the final step counts, as in MAML.
    ``adapted_names`` restricts the inner loop to those parameters (ANIL).
    """
    inner, fixed = _split(params, adapted_names)
    trajectory = adapt(
        forward, inner, buffers, rule_params, support_x, support_y,
        loss_fn=inner_loss_fn, rule=rule, steps=steps, fixed=fixed,
    )
    if step_weights is not None and len(step_weights) != steps + 1:
        raise ValueError(
            f"step_weights has {len(step_weights)} entries but {steps} inner steps need "
            f"{steps + 1} (one per point of the trajectory, theta_0 included)"
        )
    prediction = forward({**fixed, **trajectory[-1]}, buffers, query_x)
    loss = outer_loss_fn(prediction, query_y)
    if step_weights is not None:
        loss = step_weights[-1] * loss
        for weight, point in zip(step_weights[:-1], trajectory[:-1]):
            if weight:
                loss = loss + weight * outer_loss_fn(forward({**fixed, **point}, buffers, query_x), query_y)
    return loss, prediction


def meta_objective(
    forward: ForwardFn,
    params: Params,
    buffers: Params,
    rule_params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    strategy: Strategy = "vmap",
    chunk_size: int | None = None,
    **task_kwargs,
) -> tuple[Tensor, Tensor]:
    """Per-task query losses ``[T]`` and predictions ``[T, ...]`` for a meta-batch.

    The meta-loss is ``losses.mean()``. ``strategy="vmap"`` batches all tasks into one pass
    (``chunk_size`` bounds its memory); ``"loop"`` is the per-task reference.
    ``task_kwargs`` go to :func:`task_objective`.
    """
    task_fn = functools.partial(task_objective, forward, **task_kwargs)
    if strategy == "vmap":
        batched = torch.func.vmap(
            task_fn, in_dims=(None, None, None, 0, 0, 0, 0), chunk_size=chunk_size,
            randomness="different",
        )
        return batched(params, buffers, rule_params, support_x, support_y, query_x, query_y)
    if strategy == "loop":
        return _loop_over_tasks(task_fn, params, buffers, rule_params, support_x, support_y, query_x, query_y)
    raise ValueError(f"unknown strategy {strategy!r}; use 'vmap' or 'loop'")


def evaluate_trajectory(
    forward: ForwardFn,
    params: Params,
    buffers: Params,
    rule_params: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    *,
    loss_fn: LossFn,
    rule: InnerRule,
    steps: int,
    adapted_names: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Query losses ``[T, steps+1]`` and predictions ``[T, steps+1, ...]`` after 0..steps updates.

    One inner loop per task serves every step count. Call it under ``torch.no_grad()``: the
    inner ``torch.func.grad`` still works, but no outer graph is kept.
    """

    def one_task(p, b, r, sx, sy, qx, qy):
        inner, fixed = _split(p, adapted_names)
        trajectory = adapt(forward, inner, b, r, sx, sy, loss_fn=loss_fn, rule=rule, steps=steps, fixed=fixed)
        predictions = torch.stack([forward({**fixed, **point}, b, qx) for point in trajectory])
        losses = torch.stack([loss_fn(pred, qy) for pred in predictions])
        return losses, predictions

    batched = torch.func.vmap(one_task, in_dims=(None, None, None, 0, 0, 0, 0), chunk_size=chunk_size)
    return batched(params, buffers, rule_params, support_x, support_y, query_x, query_y)


def _split(params: Params, adapted_names: Sequence[str] | None) -> tuple[Params, Params]:
    """Split ``params`` into (adapted by the inner loop, held fixed in it)."""
    if adapted_names is None:
        return params, {}
    chosen = set(adapted_names)
    missing = chosen - params.keys()
    if missing:
        raise KeyError(f"adapted_names {sorted(missing)} are not parameters of the model")
    return (
        {k: v for k, v in params.items() if k in chosen},
        {k: v for k, v in params.items() if k not in chosen},
    )


def _loop_over_tasks(task_fn, params, buffers, rule_params, *batches: Tensor) -> tuple[Tensor, Tensor]:
    """Reference path: one task at a time, results stacked like ``vmap`` would."""
    losses, predictions = [], []
    for task in range(batches[0].shape[0]):
        loss, prediction = task_fn(params, buffers, rule_params, *(b[task] for b in batches))
        losses.append(loss)
        predictions.append(prediction)
    return torch.stack(losses), torch.stack(predictions)
