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

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from fastmaml import context
from fastmaml.rules import InnerRule, Params

ForwardFn = Callable[[Params, Params, Tensor], Tensor]
"""``forward(params, buffers, x) -> prediction`` for ONE task (no task dimension)."""
LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(prediction, target) -> scalar``."""
Strategy = Literal["auto", "vmap", "loop"]
"""How a meta-batch runs: ``"vmap"`` (tasks batched), ``"loop"`` (task by task) or ``"auto"``
(chosen per model, data shape and device by :func:`choose_strategy`)."""


def at_step(step: int) -> contextlib.AbstractContextManager[None]:
    """:func:`fastmaml.context.at_step`, except while ``torch.compile`` traces (TorchDynamo cannot
    trace ``ContextVar.set``); compiled learners refuse models with per-step layers instead."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return context.at_step(step)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one meta-batch runs: the per-task execution and how many tasks share one backward pass."""

    strategy: Literal["vmap", "loop"]
    backward_chunk: int | None = None
    """Tasks per backward pass (their graph is freed before the next chunk's is built); ``None``:
    the whole meta-batch in one graph."""
    threads: int = 1
    """Chunks run at once on CPU worker threads, one intra-op thread each (:mod:`fastmaml.parallel`)."""


AUTO_CHUNK_INPUT_NUMEL = 2**18
"""Most input elements (support + query examples of all its tasks) per vmapped chunk of a conv
net on CPU."""

AUTO_LOOP_TASK_NUMEL = 2**15
"""Input elements of one task above which a conv net on CPU runs task by task (the loop), where
``TaskBatchNorm`` uses torch's fused kernel and small batched convolutions stop paying off."""


AUTO_THREAD_TASK_NUMEL = 2**18
"""Input elements of one task up to which a CPU plan's chunks run on worker threads, one intra-op
thread each (:mod:`fastmaml.parallel`); larger tasks' operations are big enough to split across
threads themselves, and two of them at once contend for memory bandwidth."""


def choose_strategy(
    device_type: str, has_conv: bool, tasks: int, examples_per_task: int, example_numel: int, threads: int = 1
) -> Plan:
    """The execution ``strategy="auto"`` uses for a meta-batch: a rule fitted to measurements.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ... (``torch.device.type`` of the model).
        has_conv: the model contains convolutions (``nn.Conv1d/2d/3d`` and transposed).
        tasks: tasks in the meta-batch (T).
        examples_per_task: support + query examples of one task.
        example_numel: elements of one input example (e.g. 1 * 28 * 28 for Omniglot).
        threads: CPU threads available (``torch.get_num_threads()``).

    The rule on CPU, fitted to ``benchmarks/strategies.py``. The measurements behind each branch are
    in docs/benchmarks.md, "How ``strategy="auto"`` chooses":

    - no convolutions: vmap over the whole meta-batch (a loop pays Python and dispatch overhead T times);
    - convolutions, tasks of at most ``AUTO_LOOP_TASK_NUMEL`` input elements: vmap, in chunks of
      ``AUTO_CHUNK_INPUT_NUMEL // (input elements per task)`` tasks, each backpropagated before the next
      is built (no chunks when the meta-batch fits in one);
    - convolutions, larger tasks: the per-task loop, each task backpropagated before the next, where
      :class:`TaskBatchNorm` runs torch's fused kernel (under ``vmap`` it must use elementary ops);
    - ``threads`` > 1: backward chunks run on worker threads, one intra-op thread each
      (:mod:`fastmaml.parallel`), vmap chunks cut to ``1/threads`` of their size; tasks above
      ``AUTO_THREAD_TASK_NUMEL`` input elements (memory-bound) run one at a time on all threads.

    Other devices (CUDA): vmap over the whole meta-batch, a default still to be measured.
    """
    if device_type != "cpu" or not has_conv:
        return Plan("vmap")
    task_numel = max(1, examples_per_task * example_numel)
    if task_numel > AUTO_LOOP_TASK_NUMEL:
        if tasks == 1:
            return Plan("loop")
        return Plan("loop", 1, min(threads, tasks) if task_numel <= AUTO_THREAD_TASK_NUMEL else 1)
    chunk = AUTO_CHUNK_INPUT_NUMEL // task_numel
    if tasks <= chunk:
        return Plan("vmap")
    if threads < 2:
        return Plan("vmap", chunk)
    # Chunks in flight on all threads together stay within the bound.
    chunk = max(1, chunk // threads)
    return Plan("vmap", chunk, min(threads, -(-tasks // chunk)))


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

    support_grad = _support_gradient(support_loss, params, differentiable=not rule.first_order)
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


def _support_gradient(support_loss: Callable[[Params], Tensor], params: Params,
                      differentiable: bool = True) -> Callable[[Params], Params]:
    """The inner gradient as a function of the adapted parameters, differentiable for the outer loss.

    Outside every functorch transform, in grad mode, with parameters that require grad (the
    per-task loop in meta-training), plain ``torch.autograd.grad(create_graph=True)`` gives the
    same gradient as ``torch.func.grad`` without functorch's per-operation wrapping: per-task loops
    4% (Omniglot, 15 queries) to 29% (sinusoid) faster. Elsewhere (under ``vmap``, ``no_grad``
    evaluation and adaptation, frozen parameters) ``torch.func.grad``, which works in all of them.
    ``differentiable=False`` (a first-order rule, which stops the gradient anyway): there the loop
    records no graph of the inner backward pass (``create_graph=False``).
    """
    if not (context.outside_transforms() and torch.is_grad_enabled() and all(v.requires_grad for v in params.values())):
        return torch.func.grad(support_loss)

    def autograd_gradient(adapted: Params) -> Params:
        names = list(adapted)
        grads = torch.autograd.grad(support_loss(adapted), [adapted[n] for n in names],
                                    create_graph=differentiable, allow_unused=True)
        return {n: torch.zeros_like(adapted[n]) if g is None else g for n, g in zip(names, grads)}

    return autograd_gradient


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
        # The shared state is captured rather than passed with in_dims=None: the same batched
        # computation, without vmap flattening and matching the parameter dicts on every call.
        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return task_fn(params, buffers, rule_params, sx, sy, qx, qy)

        batched = torch.func.vmap(one_task, chunk_size=chunk_size, randomness="different")
        return batched(support_x, support_y, query_x, query_y)
    if strategy == "loop":
        return _loop_over_tasks(task_fn, params, buffers, rule_params, support_x, support_y, query_x, query_y)
    if strategy == "auto":
        raise ValueError("strategy='auto' is resolved by the learner (fastmaml.MAML, core.choose_strategy); "
                         "pass 'vmap' or 'loop' to meta_objective")
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
    inner_loss_fn: LossFn,
    outer_loss_fn: LossFn,
    rule: InnerRule,
    steps: int,
    adapted_names: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Query losses ``[T, steps+1]`` and predictions ``[T, steps+1, ...]`` after 0..steps updates.

    One inner loop per task serves every step count. It adapts with ``inner_loss_fn``, as
    meta-training does (the inner-loss scale is part of the step size), and scores the query set
    with ``outer_loss_fn``. Call it under ``torch.no_grad()``: the inner ``torch.func.grad`` still
    works, but no outer graph is kept.
    """

    def one_task(p, b, r, sx, sy, qx, qy):
        inner, fixed = _split(p, adapted_names)
        trajectory = adapt(forward, inner, b, r, sx, sy, loss_fn=inner_loss_fn, rule=rule, steps=steps, fixed=fixed)
        predictions = []
        for index, point in enumerate(trajectory):
            with at_step(index):
                predictions.append(forward({**fixed, **point}, b, qx))
        predictions = torch.stack(predictions)
        losses = torch.stack([outer_loss_fn(pred, qy) for pred in predictions])
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
