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

from fastmaml.context import at_step
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
    checkpoint: bool = False,
) -> list[Params]:
    """Run ``steps`` inner updates on one task's support set; return the whole trajectory.

    The trajectory ``[theta_0, ..., theta_steps]`` lets callers score every step (evaluation
    curves, MAML++'s multi-step loss) from one inner loop. ``fixed`` parameters take part in the
    forward pass but are not adapted (ANIL's body); they still receive meta-gradients.

    ``checkpoint=True`` keeps only each step's parameters for the outer backward and recomputes
    the step's forward and inner gradient there, so second-order memory grows with the number of
    steps by one parameter set per step instead of one full activation graph. It uses
    ``torch.autograd.grad`` inside a custom autograd function, so it runs outside ``vmap``: use it
    with ``strategy="loop"``.
    """
    frozen = fixed or {}

    def support_loss(adapted: Params, held: Params = frozen) -> Tensor:
        return loss_fn(forward({**held, **adapted}, buffers, x), y)

    support_grad = torch.func.grad(support_loss)
    trajectory = [params]
    for step in range(steps):
        if checkpoint:
            params = _checkpointed_step(support_loss, rule, rule_params, frozen, params, step)
        else:
            with at_step(step):
                grads = support_grad(params)
            params = rule.update(params, grads, rule_params, step)
        trajectory.append(params)
    return trajectory


class _RecomputedStep(torch.autograd.Function):
    """One inner update that keeps only its inputs; the backward pass recomputes the step.

    Hand-written rather than ``torch.utils.checkpoint``: the step itself runs a backward pass
    (the inner gradient), and keeping exactly the step's inputs is what bounds the memory.
    The outer backward is first order in the meta-parameters (enough for optimisers; not for
    differentiating the meta-gradient again).
    """

    @staticmethod
    def forward(ctx, step_fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN001
        ctx.step_fn = step_fn
        ctx.save_for_backward(*inputs)
        with torch.enable_grad():
            outputs = step_fn(*(t.detach().requires_grad_(t.requires_grad) for t in inputs), create_graph=False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = ctx.step_fn(*inputs, create_graph=True)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def _checkpointed_step(
    support_loss: Callable[[Params, Params], Tensor], rule: InnerRule, rule_params: Params, fixed: Params,
    params: Params, step: int,
) -> Params:
    """One inner update whose activations are recomputed in the outer backward pass."""
    groups = [list(params), list(rule_params), list(fixed)]
    sizes = [len(g) for g in groups]

    def step_fn(*values: Tensor, create_graph: bool) -> tuple[Tensor, ...]:
        current = dict(zip(groups[0], values[: sizes[0]]))
        rates = dict(zip(groups[1], values[sizes[0] : sizes[0] + sizes[1]]))
        frozen = dict(zip(groups[2], values[sizes[0] + sizes[1] :]))
        with at_step(step):
            loss = support_loss(current, frozen)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=create_graph, allow_unused=True)
        grad_dict = {n: torch.zeros_like(v) if g is None else g for (n, v), g in zip(current.items(), grads)}
        updated = rule.update(current, grad_dict, rates, step)
        return tuple(updated[n] for n in groups[0])

    outputs = _RecomputedStep.apply(step_fn, *params.values(), *rule_params.values(), *fixed.values())
    return dict(zip(groups[0], outputs))


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
    checkpoint: bool = False,
) -> tuple[Tensor, Tensor]:
    """Query loss of one task after adaptation; returns ``(loss, final query prediction)``.

    ``step_weights`` (length ``steps + 1``) gives MAML++'s multi-step loss
    ``sum_s w_s * L_query(theta_s)``; by default only the final step counts, as in MAML.
    ``adapted_names`` restricts the inner loop to those parameters (ANIL).
    """
    inner, fixed = _split(params, adapted_names)
    trajectory = adapt(
        forward, inner, buffers, rule_params, support_x, support_y,
        loss_fn=inner_loss_fn, rule=rule, steps=steps, fixed=fixed, checkpoint=checkpoint,
    )
    if step_weights is not None and len(step_weights) != steps + 1:
        raise ValueError(
            f"step_weights has {len(step_weights)} entries but {steps} inner steps need "
            f"{steps + 1} (one per point of the trajectory, theta_0 included)"
        )
    with at_step(steps):
        prediction = forward({**fixed, **trajectory[-1]}, buffers, query_x)
    loss = outer_loss_fn(prediction, query_y)
    if step_weights is not None:
        loss = step_weights[-1] * loss
        for index, (weight, point) in enumerate(zip(step_weights[:-1], trajectory[:-1])):
            if weight:
                with at_step(index):
                    query_loss = outer_loss_fn(forward({**fixed, **point}, buffers, query_x), query_y)
                loss = loss + weight * query_loss
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
    if strategy == "vmap" and task_kwargs.get("checkpoint"):
        raise ValueError("gradient checkpointing of inner steps runs per task: use strategy='loop' with it")
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
        predictions = []
        for index, point in enumerate(trajectory):
            with at_step(index):
                predictions.append(forward({**fixed, **point}, b, qx))
        predictions = torch.stack(predictions)
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
