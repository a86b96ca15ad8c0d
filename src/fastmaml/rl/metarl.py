"""MAML for reinforcement learning (the paper's section 5.3): policy-gradient inner steps through
the supervised core, and a TRPO (or clipped-surrogate) outer step on the post-update policies.

One meta-iteration:

1. sample ``T`` tasks; roll out the current policy ``theta`` on each (``B`` episodes per task);
2. inner step per task with the core's :func:`fastmaml.core.adapt` on a REINFORCE loss (linear
   feature baseline, centred advantages), vmapped over tasks: adapted policies ``theta'_i(theta)``;
   more steps resample with the adapted policies first;
3. roll out the adapted policies: the "query" episodes;
4. outer step on ``theta``: maximise the mean importance-weighted surrogate of the post-update
   policies within a mean-KL trust region, differentiating through the inner step(s).

The Fisher-vector product of the trust region is selectable: ``exact`` (the Hessian of the KL of the
adapted policies with respect to ``theta``, through the inner step), ``finite-difference`` (differences
of first derivatives, as the original code) or ``first-order`` (the inner step's Jacobian taken as the
identity). ``exact`` and ``first-order`` are computed in closed form at the sampling policies, where the
Hessian is exactly a Gauss-Newton product (see ``closed_form.OuterLinearization``), with the meta-gradient; elsewhere
(and as ``exact-double-backward``, the reference) by a double backward through the vmapped inner step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastmaml import core
from fastmaml.rl import baselines, closed_form, policies, trpo
from fastmaml.rl.sampling import BatchEnv, Trajectories, sample
from fastmaml.rules import SGD, Params

HVP_METHODS = ("exact", "finite-difference", "first-order")
_REFERENCE_HVP = "exact-double-backward"
"""The exact product by a double backward through the inner step, always (the closed form's reference)."""
ESTIMATORS = ("reinforce", "lvc")


@dataclass(frozen=True)
class InnerSettings:
    """How a policy adapts to a task: step sizes per step, estimator, discount."""

    lrs: tuple[float, ...]
    """Step size of each inner step (``len(lrs)`` steps; empty = no adaptation, the pretrained baseline)."""
    first_order: bool = False
    estimator: str = "reinforce"
    """reinforce (the paper) | lvc (ProMP's low-variance curvature estimator: same gradient, better Hessian)."""
    gamma: float = 0.99
    nonlinearity: str = "relu"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown inner estimator {self.estimator!r}; use one of {', '.join(ESTIMATORS)}")


@dataclass
class PolicyBatch:
    """Episodes packed for the core: ``x = [obs, action]`` and ``y = [advantage, mask]`` per step."""

    x: Tensor  # [T, B, H, do + da]
    y: Tensor  # [T, B, H, 2]


def pack(traj: Trajectories, adv: Tensor) -> PolicyBatch:
    return PolicyBatch(torch.cat([traj.obs, traj.actions], -1), torch.stack([adv, traj.mask], -1))


def _policy_forward(obs_dim: int, nonlinearity: str) -> core.ForwardFn:
    def forward(params: Params, buffers: Params, x: Tensor) -> Tensor:
        return policies.log_prob(params, x[..., :obs_dim], x[..., obs_dim:], nonlinearity)
    return forward


def _inner_loss(estimator: str) -> core.LossFn:
    def loss(logp: Tensor, y: Tensor) -> Tensor:
        adv, mask = y[..., 0], y[..., 1]
        weight = torch.exp(logp - logp.detach()) if estimator == "lvc" else logp
        return -(weight * adv * mask).sum() / mask.sum().clamp_min(1)
    return loss


def inner_step(params: Params, batch: PolicyBatch, lr: float, settings: InnerSettings, obs_dim: int,
               first_order: bool | None = None) -> Params:
    """One policy-gradient step per task (the core's ``adapt``, vmapped over tasks) -> stacked params."""
    first_order = settings.first_order if first_order is None else first_order
    forward = _policy_forward(obs_dim, settings.nonlinearity)
    loss_fn = _inner_loss(settings.estimator)
    rule = SGD(lr, first_order=first_order)

    def one_task(p: Params, x: Tensor, y: Tensor) -> Params:
        return core.adapt(forward, p, {}, {}, x, y, loss_fn=loss_fn, rule=rule, steps=1)[-1]

    in_dims = (0 if policies.is_stacked(params) else None, 0, 0)
    return torch.func.vmap(one_task, in_dims=in_dims)(params, batch.x, batch.y)


def adapted_policies(theta: Params, batches: list[PolicyBatch], settings: InnerSettings, obs_dim: int,
                     first_order: bool | None = None) -> Params:
    """The per-task adapted policies as a differentiable function of ``theta``."""
    params = theta
    for lr, batch in zip(settings.lrs, batches):
        params = inner_step(params, batch, lr, settings, obs_dim, first_order)
    return params


def _detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


@dataclass
class MetaBatch:
    """Everything the outer step needs from one meta-iteration's sampling."""

    batches: list[PolicyBatch]
    """Inner-step (support) episodes, one batch per inner step."""
    post: Trajectories
    """Episodes of the adapted policies (the query set)."""
    post_adv: Tensor
    old_logp: Tensor
    old_mean: Tensor
    old_log_std: Tensor
    returns: list[float]
    """Mean episode return before and after each inner step."""


def collect(env: BatchEnv, tasks: np.ndarray, theta: Params, settings: InnerSettings, rollouts: int,
            rng: np.random.Generator, device: torch.device | str = "cpu") -> MetaBatch:
    """Sample support episodes, adapt (values only), sample query episodes with the adapted policies."""
    obs_dim = env.observation_dim
    params = _detached(theta)
    batches, returns = [], []
    for lr in settings.lrs:
        traj = sample(env, tasks, params, rollouts, rng, settings.nonlinearity, device)
        returns.append(traj.episode_returns().mean().item())
        batch = pack(traj, baselines.advantages(traj.obs, traj.rewards, traj.mask, settings.gamma))
        batches.append(batch)
        params = _detached(inner_step(params, batch, lr, settings, obs_dim, first_order=True))
    post = sample(env, tasks, params, rollouts, rng, settings.nonlinearity, device)
    returns.append(post.episode_returns().mean().item())
    post_adv = baselines.advantages(post.obs, post.rewards, post.mask, settings.gamma)
    stacked = policies.is_stacked(params)
    with torch.no_grad():
        old_logp = policies.batched(functools.partial(policies.log_prob, nonlinearity=settings.nonlinearity),
                                    stacked)(params, post.obs, post.actions)
        old_mean = policies.batched(functools.partial(policies.action_mean, nonlinearity=settings.nonlinearity),
                                    stacked)(params, post.obs)
    old_log_std = params["log_std"] if stacked else params["log_std"].expand(len(tasks), -1)
    return MetaBatch(batches, post, post_adv, old_logp, old_mean, old_log_std, returns)


def _per_task_mean(values: Tensor, mask: Tensor) -> Tensor:
    return ((values * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1)).mean()


def surrogate_and_kl(theta: Params, meta: MetaBatch, settings: InnerSettings, obs_dim: int,
                     first_order: bool | None = None, clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """Outer loss (minus the importance-weighted advantage of the adapted policies, optionally
    PPO-clipped) and their mean KL from the sampling policies, both functions of ``theta``."""
    params = adapted_policies(theta, meta.batches, settings, obs_dim, first_order)
    return post_objective(params, meta, settings, clip)


def post_objective(params: Params, meta: MetaBatch, settings: InnerSettings, clip: float = 0.0
                   ) -> tuple[Tensor, Tensor]:
    """Surrogate loss and mean KL of given (adapted) policies on the query episodes."""
    stacked = policies.is_stacked(params)
    nl = settings.nonlinearity
    post = meta.post
    logp = policies.batched(functools.partial(policies.log_prob, nonlinearity=nl), stacked)(
        params, post.obs, post.actions)
    ratio = torch.exp(logp - meta.old_logp)
    objective = ratio * meta.post_adv
    if clip > 0:
        objective = torch.minimum(objective, ratio.clamp(1 - clip, 1 + clip) * meta.post_adv)
    loss = -_per_task_mean(objective, post.mask)
    kl_fn = functools.partial(policies.kl_from_old, nonlinearity=nl)
    if stacked:
        kl = torch.func.vmap(kl_fn)(meta.old_mean, meta.old_log_std, params, post.obs)
    else:
        kl = kl_fn(meta.old_mean, meta.old_log_std.unsqueeze(1).unsqueeze(1), params, post.obs)
    return loss, _per_task_mean(kl, post.mask)


def fisher_vector_product(theta: Params, meta: MetaBatch, settings: InnerSettings, obs_dim: int,
                          method: str = "exact", fd_eps: float = 1e-5) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` with ``H`` the Hessian of the mean KL with respect to ``theta`` (see module doc).

    ``exact`` and ``first-order`` use the closed form of :class:`closed_form.OuterLinearization` when it applies
    (the adapted policies equal the sampling ones, as in every TRPO step) and the double backward
    otherwise; ``exact-double-backward`` always takes the double backward (the reference).
    """
    if method not in HVP_METHODS and method != _REFERENCE_HVP:
        raise ValueError(f"unknown hvp method {method!r}; use one of {', '.join(HVP_METHODS)}")
    if method in ("exact", "first-order"):
        linear = closed_form.OuterLinearization(theta, meta, settings, obs_dim)
        if linear.gauss_newton_exact:
            return linear.fisher_vector_product(first_order=method == "first-order")
    return _autograd_fisher_vector_product(theta, meta, settings, obs_dim, method, fd_eps)


def _autograd_fisher_vector_product(theta: Params, meta: MetaBatch, settings: InnerSettings, obs_dim: int,
                                    method: str, fd_eps: float) -> Callable[[Tensor], Tensor]:
    """The general path: finite differences of gradients, or a double backward through the inner step."""
    base = trpo.flatten(theta).detach()

    def kl_gradient(vector: Tensor, create_graph: bool, first_order: bool) -> tuple[Tensor, Tensor]:
        leaf = vector.detach().clone().requires_grad_(True)
        _, kl = surrogate_and_kl(trpo.unflatten(leaf, theta), meta, settings, obs_dim, first_order=first_order)
        (grad,) = torch.autograd.grad(kl, leaf, create_graph=create_graph)
        return grad, leaf

    if method == "finite-difference":
        def finite_difference(v: Tensor) -> Tensor:
            r = fd_eps / (v.norm() + 1e-8)
            plus, _ = kl_gradient(base + r * v, False, settings.first_order)
            minus, _ = kl_gradient(base - r * v, False, settings.first_order)
            return (plus - minus) / (2 * r)
        return finite_difference

    flat_grad, leaf = kl_gradient(base, True, settings.first_order or method == "first-order")

    def double_backward(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(flat_grad @ v, leaf, retain_graph=True)
        return hv
    return double_backward


@dataclass
class OuterSettings:
    """The outer (meta) update; also the ``outer`` section of an RL config."""

    method: str = "trpo"
    """trpo (the paper) | ppo (first-order-friendly clipped surrogate with Adam, ProMP style)."""
    max_kl: float = 0.01
    """TRPO trust region: mean KL of the adapted policies from the sampling ones."""
    cg_iterations: int = 10
    """Conjugate-gradient iterations."""
    cg_damping: float = 1e-5
    """Damping added to the Fisher-vector product."""
    hvp: str = "exact"
    """Fisher-vector product: exact (closed form, or double backward) | finite-difference (the original) |
    first-order."""
    fd_eps: float = 1e-5
    """finite-difference: base step (divided by the vector's norm)."""
    backtracks: int = 15
    """Line-search trials."""
    backtrack_ratio: float = 0.8
    """Line-search shrink factor."""
    ppo_clip: float = 0.2
    """ppo: ratio clip."""
    ppo_epochs: int = 5
    """ppo: Adam steps per meta-iteration."""
    ppo_lr: float = 0.001
    """ppo: Adam learning rate."""


def trpo_step(theta: Params, meta: MetaBatch, settings: InnerSettings, outer: OuterSettings,
              obs_dim: int) -> tuple[Params, dict[str, float]]:
    """One TRPO update of ``theta`` on the MAML objective; returns new parameters and diagnostics."""
    flat = trpo.flatten(theta).detach()
    linear = closed_form.OuterLinearization(theta, meta, settings, obs_dim) if outer.hvp != _REFERENCE_HVP else None
    if linear is not None:  # the closed form (same values as autograd's, to rounding)
        loss, gradient = linear.loss.detach(), linear.gradient()
    else:
        leaf = flat.clone().requires_grad_(True)
        loss, _ = surrogate_and_kl(trpo.unflatten(leaf, theta), meta, settings, obs_dim)
        (gradient,) = torch.autograd.grad(loss, leaf)
    if not torch.isfinite(gradient).all():
        raise FloatingPointError("meta-gradient is not finite; lower the inner step size or check rewards")
    if linear is not None and outer.hvp in ("exact", "first-order"):
        fvp = (linear.fisher_vector_product(first_order=outer.hvp == "first-order") if linear.gauss_newton_exact
               else _autograd_fisher_vector_product(theta, meta, settings, obs_dim, outer.hvp, outer.fd_eps))
    else:
        fvp = fisher_vector_product(theta, meta, settings, obs_dim, outer.hvp, outer.fd_eps)
    full_step = trpo.trust_region_step(gradient, fvp, outer.max_kl, outer.cg_iterations, outer.cg_damping)
    del linear, fvp  # the cached activations, before the line search

    def evaluate(candidate: Tensor) -> tuple[float, float]:
        with torch.no_grad():
            new_loss, new_kl = surrogate_and_kl(trpo.unflatten(candidate, theta), meta, settings, obs_dim,
                                                first_order=True)
        return new_loss.item(), new_kl.item()

    new_flat, search = trpo.backtracking_line_search(evaluate, flat, full_step, loss.item(), outer.max_kl,
                                                     outer.backtracks, outer.backtrack_ratio)
    new_theta = {k: v.detach().clone() for k, v in trpo.unflatten(new_flat, theta).items()}
    stats = {"surrogate_before": -loss.item(), "surrogate_after": -search.loss, "kl": search.kl,
             "step_accepted": float(search.accepted), "step_fraction": search.step_fraction,
             "grad_norm": gradient.norm().item()}
    return new_theta, stats


def ppo_step(theta: Params, meta: MetaBatch, settings: InnerSettings, outer: OuterSettings, obs_dim: int,
             optimizer_state: dict) -> tuple[Params, dict[str, float]]:
    """First-order-friendly outer step: a few Adam epochs on the clipped surrogate (ProMP style).

    ``optimizer_state`` (Adam's moments) is updated in place so the caller can checkpoint it.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=outer.ppo_lr)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    loss = kl = torch.tensor(math.nan)
    for _ in range(outer.ppo_epochs):
        loss, kl = surrogate_and_kl(params, meta, settings, obs_dim, clip=outer.ppo_clip)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer_state.clear()
    optimizer_state.update(optimizer.state_dict())
    return _detached(params), {"surrogate_after": -loss.item(), "kl": kl.item()}


def evaluate_adaptation(env: BatchEnv, tasks: np.ndarray, theta: Params, settings: InnerSettings, steps: int,
                        rollouts: int, rng: np.random.Generator, device: torch.device | str = "cpu") -> Tensor:
    """Mean episode return of each task after 0..steps policy-gradient steps: ``[len(tasks), steps + 1]``.

    Step ``k`` uses ``settings.lrs[min(k, len - 1)]`` (the paper: alpha, then alpha / 2).
    """
    obs_dim = env.observation_dim
    params = _detached(theta)
    results = []
    for k in range(steps + 1):
        traj = sample(env, tasks, params, rollouts, rng, settings.nonlinearity, device)
        results.append(traj.episode_returns().mean(1).double().cpu())
        if k < steps:
            batch = pack(traj, baselines.advantages(traj.obs, traj.rewards, traj.mask, settings.gamma))
            lr = settings.lrs[min(k, len(settings.lrs) - 1)]
            params = _detached(inner_step(params, batch, lr, settings, obs_dim, first_order=True))
    return torch.stack(results, 1)
