"""Learners: ``nn.Module`` shells that own the user's model and the rule's meta-parameters.

Because a learner is an ``nn.Module``, ``torch.optim.Adam(learner.parameters())``,
``state_dict()``, DDP and ``torch.compile`` work as PyTorch users expect. All computation is
delegated to the pure core (:mod:`fastmaml.core`); variants differ only by the rule and
options they pass it (composition, not flags piled on one class).

Example:
    >>> import torch, fastmaml
    >>> from fastmaml.tasks.sinusoid import SinusoidTasks
    >>> learner = fastmaml.MAML(fastmaml.sinusoid_mlp(), inner_lr=0.01, inner_steps=1)
    >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    >>> tasks = SinusoidTasks(shots=5, queries=5)
    >>> for _ in range(3):
    ...     out = learner.meta_loss(tasks.sample(25, torch.Generator().manual_seed(0)))
    ...     optimizer.zero_grad(); out.loss.backward(); optimizer.step()
    >>> model = learner.adapt(torch.randn(5, 1), torch.randn(5, 1), steps=10)
    >>> model(torch.zeros(3, 1)).shape
    torch.Size([3, 1])
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from fastmaml import context, core, parallel
from fastmaml.core import ForwardFn
from fastmaml.episode import Episode
from fastmaml.losses import LossName, Reduction, make_loss
from fastmaml.models import TaskBatchNorm, batchnorm_parameter_names, check_meta_learnable, per_step_batchnorm
from fastmaml.rules import SGD, InnerRule, Params, PerLayerPerStepLR, PerParameterLR

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class MetaOutput(NamedTuple):
    """What one meta-batch gives: the meta-loss to backpropagate and per-task diagnostics."""

    loss: Tensor
    task_losses: Tensor
    accuracy: Tensor | None


class AdaptedModel:
    """A model with task-adapted parameters, callable like the original ``nn.Module``.

    It predicts as the trajectory point ``step`` it was adapted to, so layers with per-step
    weights (MAML++'s per-step BatchNorm) use that step's weights, as evaluation does.
    """

    def __init__(self, model: nn.Module, params: Params, buffers: Params, step: int = 0) -> None:
        self.model, self.params, self.buffers, self.step = model, params, buffers, step

    def __call__(self, x: Tensor) -> Tensor:
        with context.at_step(self.step):
            return torch.func.functional_call(self.model, (self.params, self.buffers), (x,))


def _escape(name: str) -> str:
    return name.replace(".", "__")


class _Reparametrized:
    """``forward(params, buffers, x)``: the model called with other tensors in its parameter and
    buffer slots, as ``torch.func.functional_call`` does, but with the name-to-slot table built
    once rather than on every call (the per-call cost matters for small tasks: about 6% of a
    sinusoid meta-step). Tied parameters are filled under their first name, as
    ``functional_call(..., tie_weights=True)``; under ``torch.compile`` it defers to
    ``functional_call``, which TorchDynamo knows.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots: dict[str, list[tuple[dict, str]]] = {}
        self.owners: dict[str, Tensor] = {}

    def sync(self, params: Params, buffers: Params) -> bool:
        """Rebuild the table if the model's tensors are no longer those it was built from; say if it did."""
        if len(self.owners) == len(params) + len(buffers) and all(
            self.owners.get(k) is v for k, v in itertools.chain(params.items(), buffers.items())
        ):
            return False
        names: dict[int, str] = {}
        for name, tensor in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            names.setdefault(id(tensor), name)
        slots: dict[str, dict[tuple[int, str], tuple[dict, str]]] = {}
        for module in self.model.modules():
            for table in (module._parameters, module._buffers):
                for attr, tensor in table.items():
                    if tensor is not None and id(tensor) in names:
                        slots.setdefault(names[id(tensor)], {})[id(table), attr] = (table, attr)
        self.slots = {name: list(found.values()) for name, found in slots.items()}
        self.owners = dict(itertools.chain(params.items(), buffers.items()))
        return True

    def replica(self) -> _Reparametrized:
        """The same function on a structural copy of the model that shares its tensors: the
        parameter slots are filled per call, so concurrent threads each need their own copy."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return _Reparametrized(copy.deepcopy(self.model, {id(t): t for t in tensors}))

    def follow(self, original: nn.Module) -> None:
        """Copy ``original``'s train/eval flags onto this (replica's) model."""
        for source, target in zip(original.modules(), self.model.modules()):
            target.training = source.training

    def __call__(self, params: Params, buffers: Params, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or not self.slots:
            return torch.func.functional_call(self.model, (params, buffers), (x,))
        saved = []
        try:
            for name, value in itertools.chain(params.items(), buffers.items()):
                for table, attr in self.slots[name]:
                    saved.append((table, attr, table[attr]))
                    table[attr] = value
            return self.model(x)
        finally:
            for table, attr, value in reversed(saved):
                table[attr] = value


def check_inner_loop(inner_lr: float, inner_steps: int) -> None:
    """The inner loop's settings, checked where a learner is built (before any rule uses them):
    a string or NaN step size otherwise fails deep inside the first meta-step, or trains on NaN."""
    if not isinstance(inner_lr, numbers.Real) or isinstance(inner_lr, bool):
        raise TypeError(f"inner_lr must be a real number (float), got {type(inner_lr).__name__} {inner_lr!r}; "
                        "pass e.g. inner_lr=0.01")
    if not math.isfinite(inner_lr):
        raise ValueError(f"inner_lr must be finite, got {inner_lr!r}; pass e.g. inner_lr=0.01")
    if not isinstance(inner_steps, numbers.Integral) or isinstance(inner_steps, bool):
        raise TypeError(f"inner_steps must be an int, got {type(inner_steps).__name__} {inner_steps!r}; "
                        "pass e.g. inner_steps=1")
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")


def _add_gradients(total: Sequence[Tensor | None], more: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Element-wise sum of two gradient lists in which ``None`` means zero."""
    return [b if a is None else (a if b is None else a + b) for a, b in zip(total, more)]


class _PrecomputedGradient(torch.autograd.Function):
    """A loss value whose gradients with respect to ``inputs`` were computed already, chunk by chunk."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple[Tensor | None, ...], *inputs: Tensor) -> Tensor:  # noqa: ANN001
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        if torch.is_grad_enabled():
            raise RuntimeError(
                "this meta-loss was backpropagated chunk by chunk inside meta_loss (strategy='auto' chose "
                "backward chunks), so it cannot be differentiated twice (create_graph=True); pass "
                "strategy='vmap' or 'loop' for higher-order derivatives of the meta-loss"
            )
        return (None, None, *(None if g is None else g * grad_output for g in ctx.grads))


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning (Finn et al. 2017) over any ``nn.Module``.

    Args:
        model: the network to meta-learn; BatchNorm must use current-batch statistics
            (see :func:`fastmaml.convert_batchnorm`).
        inner_lr: inner step size alpha (ignored when ``rule`` is given).
        inner_steps: inner steps in meta-training.
        first_order: drop second derivatives (FOMAML).
        loss: ``"mse"``, ``"cross_entropy"`` or a callable ``(pred, target) -> scalar``.
        reduction: inner-loss scale, ``"mean"`` or ``"sum_over_classes"`` (the original code's).
        rule: an inner update rule (:mod:`fastmaml.rules`); its meta-parameters become
            parameters of this module.
        adapted_names: adapt only these parameters in the inner loop (ANIL); all are meta-learned.
        step_weights: MAML++'s multi-step loss weights (``inner_steps + 1`` entries).
        strategy: ``"auto"`` (default: chosen per model, data shape and device by
            :func:`fastmaml.core.choose_strategy`; see :meth:`plan`), ``"vmap"`` (all tasks in one
            batched pass) or ``"loop"`` (task by task, the reference).
        chunk_size: tasks per vmapped chunk, to bound memory.
        checkpoint: recompute each inner step in the outer backward (memory grows far more slowly
            with the number of steps); needs ``strategy="loop"``.
        schedule: per-iteration changes of the objective (MAML++'s annealing); the trainer calls
            :meth:`begin_iteration` before each meta-batch.
        compile: ``torch.compile`` the vmapped meta-objective (``True``, or the name of a
            ``torch.compile`` backend). The first meta-batch of each shape compiles (about 30 s for
            the sinusoid MLP on 2 CPU cores); runs the vmap strategy; refused for models with
            per-step layers (MAML++'s per-step BatchNorm), whose step context it cannot trace.
        compile_mode: ``torch.compile``'s mode: ``"reduce-overhead"`` captures the compiled meta-step
            in CUDA graphs on GPU (one launch instead of thousands: MAML on small tasks is
            launch-bound there); ``"max-autotune"`` also tunes kernels. Ignored without ``compile``.
        precision: ``"bf16"`` runs the model's forward (and so its derivatives) under
            ``torch.autocast`` in bfloat16, in meta-training and in :meth:`evaluate`; parameters,
            inner-loop updates and losses stay float32 (logits are cast back before the loss).
        task_threads: CPU threads that run the backward chunks of an ``"auto"`` plan concurrently,
            one intra-op thread each (:mod:`fastmaml.parallel`); ``None`` (default): the plan's
            choice (:func:`fastmaml.core.choose_strategy`), ``1``: one chunk after another.
            Each worker runs a structural copy of the model (``copy.deepcopy`` sharing its
            tensors, following ``train()``/``eval()``; other Python state a forward changes stays
            in the copy); models with dropout (the global generator
            would be drawn from in thread order) or that cannot be copied run their chunks one
            after another.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        *,
        loss: LossName | Callable[[Tensor, Tensor], Tensor] = "mse",
        reduction: Reduction = "mean",
        rule: InnerRule | None = None,
        adapted_names: Sequence[str] | None = None,
        step_weights: Sequence[float] | None = None,
        strategy: core.Strategy = "auto",
        chunk_size: int | None = None,
        checkpoint: bool = False,
        schedule: MAMLPlusPlusSchedule | None = None,
        compile: bool | str = False,
        compile_mode: str = "default",
        precision: Precision = "fp32",
        task_threads: int | None = None,
    ) -> None:
        super().__init__()
        check_meta_learnable(model)
        check_inner_loop(inner_lr, inner_steps)
        self.model = model
        self.inner_steps = inner_steps
        self.rule: InnerRule = rule if rule is not None else SGD(inner_lr, first_order)
        self.is_classifier = loss == "cross_entropy"
        self.inner_loss_fn = make_loss(loss, reduction) if isinstance(loss, str) else loss
        self.outer_loss_fn = make_loss(loss, "mean") if isinstance(loss, str) else loss
        self.adapted_names = list(adapted_names) if adapted_names is not None else None
        self.step_weights = list(step_weights) if step_weights is not None else None
        if strategy not in ("auto", "vmap", "loop"):
            raise ValueError(f"unknown strategy {strategy!r}; use 'auto', 'vmap' or 'loop'")
        self.strategy: core.Strategy = strategy
        self.chunk_size = chunk_size
        if checkpoint and strategy != "loop":
            raise ValueError("checkpoint=True recomputes inner steps per task: use strategy='loop' with it")
        self.checkpoint = checkpoint
        self.schedule = schedule
        if compile:
            if strategy == "loop":
                raise ValueError("compile=True compiles the vmapped meta-objective: use strategy='auto' or 'vmap'")
            per_step = [n for n, m in model.named_modules() if isinstance(m, TaskBatchNorm) and m.steps > 1]
            if per_step:
                raise ValueError(f"compile=True cannot trace the inner-step context that per-step layers read "
                                 f"({per_step[0]!r} is a per-step TaskBatchNorm); use compile=False")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile_mode {compile_mode!r}; use one of {', '.join(COMPILE_MODES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use 'fp32' or 'bf16'")
        self.compile_objective = compile  # not `self.compile`: that is nn.Module.compile
        self.compile_mode = compile_mode
        self.precision: Precision = precision
        self._compiled: Callable | None = None
        self.has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
        if task_threads is not None and task_threads < 1:
            raise ValueError(f"task_threads must be >= 1 (or None for the plan's choice), got {task_threads}")
        self.task_threads = task_threads
        self._random = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
        self._reparametrized = _Reparametrized(model)
        self._replicas: list[_Reparametrized] = []
        self._uncopyable = False
        adapted = {k: p.detach() for k, p in model.named_parameters() if self._adapts(k)}
        self.rule_params = nn.ParameterDict(
            {_escape(k): nn.Parameter(v.clone()) for k, v in self.rule.init(adapted).items()}
        )

    # -- pieces handed to the pure core -------------------------------------------------
    def _adapts(self, name: str) -> bool:
        return self.adapted_names is None or name in self.adapted_names

    def _forward(self, params: Params, buffers: Params, x: Tensor,
                 reparametrized: _Reparametrized | None = None) -> Tensor:
        out = (reparametrized or self._reparametrized)(params, buffers, x)
        return out.float() if self.precision == "bf16" else out  # losses and inner updates in float32

    def _replica_forwards(self, threads: int, params: Params, buffers: Params) -> list[ForwardFn] | None:
        """``_forward`` through each worker's own copy of the model (see :mod:`fastmaml.parallel`), or
        ``None`` if the model cannot be copied (a module holding a lock, say): then no threads."""
        if self._uncopyable:
            return None
        try:
            return [self._replica_forward(worker, params, buffers) for worker in range(threads)]
        except (TypeError, copy.Error, RuntimeError):  # what deepcopy raises for objects it cannot copy
            self._uncopyable = True  # not tried again every meta-batch
            return None

    def _replica_forward(self, worker: int, params: Params, buffers: Params) -> ForwardFn:
        while len(self._replicas) <= worker:
            self._replicas.append(self._reparametrized.replica())
        replica = self._replicas[worker]
        replica.follow(self.model)
        replica.sync(params, buffers)
        return functools.partial(self._forward, reparametrized=replica)

    def _threads_allowed(self, x: Tensor) -> bool:
        """Whether chunks may run on worker threads: thread-local state (grad mode, autocast,
        functorch transforms) is the default there, so only when it is the default here too."""
        return (x.device.type == "cpu" and not self.compile_objective and not self._random
                and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and context.outside_transforms())

    def _autocast(self, x: Tensor) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on ``x``'s device when ``precision="bf16"``, else nothing."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)

    def _state(self) -> tuple[Params, Params, Params]:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        rule_params = {k: self.rule_params[_escape(k)] for k in params if _escape(k) in self.rule_params}
        if self._reparametrized.sync(params, buffers):
            self._replicas.clear()  # copies of a model whose tensors (or modules) were replaced
            self._uncopyable = False
        return params, buffers, rule_params

    def _check(self, *inputs: Tensor) -> None:
        """Fail where data enters, naming the fix, rather than deep inside vmap."""
        reference = next(self.model.parameters())
        for x in inputs:
            if x.device != reference.device:
                raise ValueError(f"inputs are on {x.device} but the model is on {reference.device}; move one of them")
            if x.is_floating_point() and x.dtype != reference.dtype:
                raise ValueError(f"inputs are {x.dtype} but the model is {reference.dtype}; "
                                 "convert them (episode.to(dtype=...)) or the model")

    def _objective(self) -> Callable[..., tuple[Tensor, Tensor]]:
        if not self.compile_objective:
            return core.meta_objective
        if self._compiled is None:
            backend = self.compile_objective if isinstance(self.compile_objective, str) else "inductor"
            mode = None if self.compile_mode == "default" else self.compile_mode
            self._compiled = torch.compile(core.meta_objective, fullgraph=True, backend=backend, mode=mode)
        return self._compiled

    def _run(self, episode: Episode, steps: int, strategy: str,
             forward: ForwardFn | None = None) -> tuple[Tensor, Tensor | None]:
        """Per-task query losses ``[T]`` (with their graph) and the accuracy of one (sub-)batch."""
        params, buffers, rule_params = self._state()
        with self._autocast(episode.support_x):
            losses, predictions = self._objective()(
                forward or self._forward, params, buffers, rule_params,
                episode.support_x, episode.support_y, episode.query_x, episode.query_y,
                strategy=strategy, chunk_size=self.chunk_size,
                inner_loss_fn=self.inner_loss_fn, outer_loss_fn=self.outer_loss_fn, rule=self.rule,
                steps=steps, step_weights=self.step_weights if steps == self.inner_steps else None,
                adapted_names=self.adapted_names, checkpoint=self.checkpoint,
            )
        accuracy = None
        if self.is_classifier:
            accuracy = (predictions.detach().argmax(-1) == episode.query_y).float().mean()
        return losses, accuracy

    # -- public API ---------------------------------------------------------------------
    def plan(self, episode: Episode) -> core.Plan:
        """How :meth:`meta_loss` runs ``episode``: the strategy given, or for ``"auto"`` the one
        :func:`fastmaml.core.choose_strategy` picks for this model, data shape and device, for
        ``task_threads`` threads (default: torch's intra-op thread count)."""
        if self.strategy != "auto":
            return core.Plan(self.strategy)
        x = episode.support_x
        threads = self.task_threads
        if threads is None:  # asked only where the rule uses it (CPU conv nets): see DistContext.close
            threads = torch.get_num_threads() if x.device.type == "cpu" and self.has_conv else 1
        plan = core.choose_strategy(
            device_type=x.device.type, has_conv=self.has_conv, tasks=x.shape[0],
            examples_per_task=x.shape[1] + episode.query_x.shape[1], example_numel=math.prod(x.shape[2:]),
            threads=threads,
        )
        return dataclasses.replace(plan, strategy="vmap", threads=1) if self.compile_objective else plan

    def meta_loss(self, episode: Episode, steps: int | None = None) -> MetaOutput:
        """Mean query loss over the tasks of ``episode`` after inner adaptation (differentiable).

        When the plan (``strategy="auto"``) has backward chunks and gradients are on, each chunk's
        graph is built and backpropagated here, then freed; the returned loss carries the
        accumulated gradient, so ``loss.backward()`` gives the same ``.grad`` as one graph would
        (only first derivatives: ``create_graph=True`` through it raises).
        """
        self._check(episode.support_x, episode.query_x)
        episode.require_queries("meta_loss")
        steps = self.inner_steps if steps is None else steps
        plan = self.plan(episode)
        total = episode.num_tasks
        if plan.backward_chunk is None or plan.backward_chunk >= total or not torch.is_grad_enabled():
            losses, accuracy = self._run(episode, steps, plan.strategy)
            return MetaOutput(losses.mean(), losses.detach(), accuracy)
        params, buffers, rule_params = self._state()
        inputs = list({id(t): t for t in itertools.chain(
            params.values(), buffers.values(), rule_params.values(),
            (episode.support_x, episode.support_y, episode.query_x, episode.query_y),
        ) if t.requires_grad}.values())
        parts = [episode.task(slice(start, start + plan.backward_chunk))
                 for start in range(0, total, plan.backward_chunk)]
        threads = min(plan.threads, len(parts)) if self._threads_allowed(episode.support_x) else 1
        forwards = self._replica_forwards(threads, params, buffers) if threads > 1 else None
        if forwards is None:
            threads, forwards = 1, [None]

        def run_parts(worker: int, share: list[Episode]) -> tuple[list[Tensor | None], list[Tensor], list[Tensor]]:
            """Build, backpropagate and free the chunks of ``share`` in order; their summed gradients."""
            forward = forwards[worker]
            grads: list[Tensor | None] = [None] * len(inputs)
            share_losses, share_correct = [], []
            for part in share:
                losses, accuracy = self._run(part, steps, plan.strategy, forward)
                if inputs:
                    part_grads = torch.autograd.grad(losses.sum() / total, inputs, allow_unused=True)
                    grads = _add_gradients(grads, part_grads)
                share_losses.append(losses.detach())
                if accuracy is not None:
                    share_correct.append(accuracy * part.num_tasks)
            return grads, share_losses, share_correct

        if threads > 1:
            # Worker w takes chunks w, w + threads, ...: a fixed assignment, so a fixed summation order.
            results = parallel.chunk_threads(threads).run(run_parts, parallel.deal(parts, threads))
            grads = results[0][0]
            for share_grads, _, _ in results[1:]:
                grads = _add_gradients(grads, share_grads)
            task_losses = [results[index % threads][1][index // threads] for index in range(len(parts))]
            correct = [c for _, _, share_correct in results for c in share_correct]
        else:
            grads, task_losses, correct = run_parts(0, parts)
        losses = torch.cat(task_losses)
        accuracy = torch.stack(correct).sum() / total if correct else None
        loss = _PrecomputedGradient.apply(losses.mean(), tuple(grads), *inputs) if inputs else losses.mean()
        return MetaOutput(loss, losses, accuracy)

    def backward_in_chunks(self, episode: Episode, chunk: int, steps: int | None = None) -> MetaOutput:
        """Backpropagate the meta-loss ``chunk`` tasks at a time; returns the (detached) result.

        The gradients equal ``meta_loss(episode).loss.backward()``, but only one chunk's graph is
        alive at once, so peak memory is that of ``chunk`` tasks, not the whole meta-batch (what
        per-task libraries get by calling backward per task). Gradients accumulate into ``.grad``.
        """
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        total = episode.num_tasks
        task_losses, correct = [], []
        for start in range(0, total, chunk):
            part = episode.task(slice(start, start + chunk))
            out = self.meta_loss(part, steps)
            (out.loss * (part.num_tasks / total)).backward()
            task_losses.append(out.task_losses)
            if out.accuracy is not None:
                correct.append(out.accuracy * part.num_tasks)
        losses = torch.cat(task_losses)
        accuracy = torch.stack(correct).sum() / total if correct else None
        return MetaOutput(losses.mean(), losses, accuracy)

    @torch.no_grad()
    def evaluate(self, episode: Episode, steps: int, rule: InnerRule | None = None) -> tuple[Tensor, Tensor | None]:
        """Query loss (and accuracy for classifiers) per task after 0..steps updates: ``[T, steps+1]``.

        ``rule`` overrides the inner rule, e.g. a tuned step size for a pretrained baseline.
        """
        self._check(episode.support_x, episode.query_x)
        episode.require_queries("evaluate")
        params, buffers, rule_params = self._state()
        with self._autocast(episode.support_x):
            losses, predictions = core.evaluate_trajectory(
                self._forward, params, buffers, rule_params,
                episode.support_x, episode.support_y, episode.query_x, episode.query_y,
                inner_loss_fn=self.inner_loss_fn, outer_loss_fn=self.outer_loss_fn,
                rule=self.rule if rule is None else rule, steps=steps,
                adapted_names=self.adapted_names, chunk_size=self.chunk_size,
            )
        accuracy = None
        if self.is_classifier:
            accuracy = (predictions.argmax(-1) == episode.query_y.unsqueeze(1)).float().mean(-1)
        return losses, accuracy

    def adapt(self, x: Tensor, y: Tensor, steps: int | None = None, rule: InnerRule | None = None) -> AdaptedModel:
        """Adapt to one new task from its examples ``x, y`` (no task dimension); returns a callable model.

        ``rule`` overrides the inner rule (e.g. a tuned test-time step size).
        """
        self._check(x, y)
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"adapt takes one task's inputs x [n, ...] and targets y [n, ...] (no task dimension), "
                             f"got x {list(x.shape)} and y {list(y.shape)}; pass episode.support_x[i], support_y[i]")
        if x.shape[0] == 0:
            raise ValueError(f"adapt got an empty support set (x {list(x.shape)}): give it at least one example")
        steps = self.inner_steps if steps is None else steps
        params, buffers, rule_params = self._state()
        with torch.no_grad():
            inner = {k: v for k, v in params.items() if self._adapts(k)}
            fixed = {k: v.detach() for k, v in params.items() if not self._adapts(k)}
            trajectory = core.adapt(
                self._forward, inner, buffers, rule_params, x, y,
                loss_fn=self.inner_loss_fn, rule=self.rule if rule is None else rule, steps=steps, fixed=fixed,
            )
        adapted = {**fixed, **{k: v.detach() for k, v in trajectory[-1].items()}}
        return AdaptedModel(self.model, adapted, buffers, step=steps)

    def with_first_order(self, first_order: bool) -> None:
        """Switch the derivative order in place (MAML++'s derivative-order annealing)."""
        self.rule = dataclasses.replace(self.rule, first_order=first_order)

    def begin_iteration(self, iteration: int) -> None:
        """Apply the schedule (if any) for meta-training iteration ``iteration`` (0-based)."""
        if self.schedule is not None:
            self.step_weights = self.schedule.step_weights(iteration)
            if self.rule.first_order != self.schedule.first_order(iteration):
                self.with_first_order(self.schedule.first_order(iteration))


@dataclasses.dataclass(frozen=True)
class MAMLPlusPlusSchedule:
    """MAML++'s annealing (Antoniou et al. 2019): multi-step loss and derivative order.

    Multi-step loss: every trajectory point 1..S starts with weight 1/S; over ``msl_iterations``
    the weights of points 1..S-1 fall linearly to 0.03/S and the final point takes the rest
    (``msl_iterations=0``: final point only, as MAML). Derivative order: first order for the first
    ``first_order_iterations`` iterations, second order after.
    """

    steps: int
    msl_iterations: int = 0
    first_order_iterations: int = 0

    def step_weights(self, iteration: int) -> list[float]:
        """Weights of trajectory points 0..steps (point 0, the unadapted model, gets 0)."""
        s = self.steps
        if self.msl_iterations <= 0 or s == 1:
            return [0.0] * s + [1.0]
        progress = min(iteration / self.msl_iterations, 1.0)
        early = (1.0 / s) * (1.0 - progress) + (0.03 / s) * progress
        return [0.0] + [early] * (s - 1) + [1.0 - early * (s - 1)]

    def first_order(self, iteration: int) -> bool:
        return iteration < self.first_order_iterations


def FOMAML(model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, **kwargs) -> MAML:
    """First-order MAML: the meta-gradient is the query gradient at the adapted parameters."""
    return MAML(model, inner_lr, inner_steps, first_order=True, **kwargs)


def MetaSGD(
    model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False, **kwargs
) -> MAML:
    """Meta-SGD (Li et al. 2017): a learned inner step size per parameter element."""
    check_inner_loop(inner_lr, inner_steps)
    return MAML(model, inner_steps=inner_steps, rule=PerParameterLR(inner_lr, first_order), **kwargs)


def ANIL(model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, head: str = "head", **kwargs) -> MAML:
    """ANIL (Raghu et al. 2020): the inner loop adapts only the head; the body is meta-learned."""
    names = [n for n, _ in model.named_parameters() if n == head or n.startswith(head + ".")]
    if not names:
        available = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})
        raise ValueError(f"ANIL adapts only the head, but the model has no parameters under {head!r}; "
                         f"pass head= one of the modules {available}")
    return MAML(model, inner_lr, inner_steps, adapted_names=names, **kwargs)


def MAMLPlusPlus(
    model: nn.Module,
    inner_lr: float = 0.1,
    inner_steps: int = 5,
    *,
    msl_iterations: int = 0,
    first_order_iterations: int = 0,
    per_step_bn: bool = True,
    learn_inner_lr: bool = True,
    **kwargs,
) -> MAML:
    """MAML++ (Antoniou et al. 2019) as composition over the same core.

    Learned per-layer per-step inner rates (LSLR), per-step BatchNorm weights (BNWB; BatchNorm is
    not adapted in the inner loop), multi-step loss and derivative-order annealing (the schedule).
    The cosine-annealed meta learning rate belongs to the trainer (``train.lr_schedule=cosine``).
    """
    check_inner_loop(inner_lr, inner_steps)
    if per_step_bn:
        model = per_step_batchnorm(model, inner_steps + 1)
    norm = set(batchnorm_parameter_names(model))
    adapted = [n for n, _ in model.named_parameters() if n not in norm]
    schedule = MAMLPlusPlusSchedule(inner_steps, msl_iterations, first_order_iterations)
    rule = PerLayerPerStepLR(inner_lr, inner_steps) if learn_inner_lr else SGD(inner_lr)
    learner = MAML(model, inner_steps=inner_steps, rule=rule, adapted_names=adapted, schedule=schedule, **kwargs)
    learner.begin_iteration(0)
    return learner


def LSLR(model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = False, **kwargs) -> MAML:
    """MAML with MAML++'s learned per-layer, per-step inner step sizes."""
    check_inner_loop(inner_lr, inner_steps)
    return MAML(model, inner_steps=inner_steps, rule=PerLayerPerStepLR(inner_lr, inner_steps, first_order), **kwargs)
