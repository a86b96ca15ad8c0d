"""The MAML-TRPO outer step's derivatives in closed form, for SGD inner steps on the Gaussian MLP policy.

Why: the generic path (a double backward through the vmapped inner step, in :mod:`fastmaml.rl.metarl`)
was 80-90% of a meta-iteration; this form gives the same Fisher-vector products and meta-gradient to
float rounding (tested against it in float64) at about 2.5x the speed and a third of the memory
(``benchmarks/rl_fvp.py``). :mod:`fastmaml.rl.metarl` uses it where it applies and falls back otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastmaml.rl import policies, trpo
from fastmaml.rules import Params

if TYPE_CHECKING:
    from fastmaml.rl.metarl import InnerSettings, MetaBatch, PolicyBatch

# --- The outer step in closed form -------------------------------------------------------------------------
#
# With the adapted policies phi_i(theta) equal to the sampling policies (true at the theta that sampled the
# query episodes), the KL's gradient with respect to phi_i vanishes, so its Hessian with respect to theta is
# exactly the Gauss-Newton form  H = sum_i J_i^T F_i J_i : F_i the Hessian of the task's KL term with respect
# to phi_i (the Gaussian policy's Fisher: a jvp and a vjp through the MLP) and J_i = dphi_i/dtheta, which for
# SGD steps is a product of  I - alpha H_inner  factors, each symmetric (a Hessian of the inner loss, LVC's
# included). Everything constant across the conjugate-gradient iterations (forward activations, first-order
# backward signals, per-sample weights) is computed once; a product then costs one R-forward and one
# R-backward (Pearlmutter) through the MLP per inner step and direction, written with batched matmuls.


def _linear(h: Tensor, weight: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``h [T, N, in]`` times per-task ``weight [T, out, in]`` transposed, plus ``bias [T, out]``.

    A narrow result (the action mean) is computed transposed, ``weight h^T``: about twice as fast."""
    if out is None and weight.shape[-2] < weight.shape[-1]:
        if bias is None:
            return torch.bmm(weight, h.mT).mT
        return torch.baddbmm(bias.unsqueeze(-1), weight, h.mT).mT
    if bias is None:
        return torch.bmm(h, weight.mT, out=out)
    return torch.baddbmm(bias.unsqueeze(1), h, weight.mT, out=out)


def _contract(a: Tensor, b: Tensor) -> Tensor:
    """``sum_n a_n^T b_n`` over the samples of ``a [T, N, p]`` and ``b [T, N, q]``: ``[T, p, q]``, with the
    narrower operand on the left (about twice as fast for a narrow one)."""
    return torch.bmm(a.mT, b) if a.shape[-1] <= b.shape[-1] else torch.bmm(b.mT, a).mT


class _Workspace:
    """Activation-sized buffers reused by every product: fresh allocations of this size page-fault on each
    call and cost more than the arithmetic of the elementwise passes over them."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], Tensor] = {}

    def __call__(self, name: str, layer: int, like: Tensor, width: int) -> Tensor:
        shape = (*like.shape[:-1], width)
        buffer = self.buffers.get((name, layer))
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype:
            buffer = self.buffers[(name, layer)] = like.new_empty(shape)
        return buffer


@dataclass
class _Activations:
    """One forward pass of the policy MLP with per-task parameters, kept for jvps and vjps."""

    inputs: list[Tensor]
    """Input of each layer ``[T, N, fan_in]`` (the observations, then the hidden activations)."""
    slopes: list[Tensor]
    """Derivative of the nonlinearity at each hidden layer's pre-activation."""
    curvatures: list[Tensor | None]
    """Its second derivative (None for ReLU, whose second derivative is zero)."""
    mean: Tensor


def _mlp_forward(params: Params, obs: Tensor, nonlinearity: str) -> _Activations:
    layers = policies.num_layers(params)
    inputs, slopes, curvatures = [], [], []
    h = obs
    for k in range(layers):
        inputs.append(h)
        h = _linear(h, params[f"layers.{k}.weight"], params[f"layers.{k}.bias"])
        if k < layers - 1:
            if nonlinearity == "relu":
                slope = (h > 0).to(h.dtype)
                h = h.mul_(slope)
                curvatures.append(None)
            else:
                h = h.tanh_()
                slope = 1 - h * h
                curvatures.append(-2 * h * slope)
            slopes.append(slope)
    return _Activations(inputs, slopes, curvatures, h)


def _mlp_backward(params: Params, acts: _Activations, cotangent: Tensor, workspace: _Workspace | None = None
                  ) -> tuple[Params, list[Tensor], list[Tensor]]:
    """vjp of the mean with respect to the layers: gradients, and the backward signals at each layer's
    pre-activation and at each hidden layer's output (kept for R-backward passes unless ``workspace``
    holds them, when they are overwritten by the next product)."""
    layers = policies.num_layers(params)
    grads: Params = {}
    deltas: list[Tensor] = [cotangent] * layers
    hidden: list[Tensor] = [cotangent] * (layers - 1)
    delta = cotangent
    for k in reversed(range(layers)):
        deltas[k] = delta
        grads[f"layers.{k}.weight"] = _contract(delta, acts.inputs[k])
        grads[f"layers.{k}.bias"] = delta.sum(1)
        if k > 0:
            slope = acts.slopes[k - 1]
            weight = params[f"layers.{k}.weight"]
            if workspace is None:
                hidden[k - 1] = torch.bmm(delta, weight)
                delta = hidden[k - 1] * slope
            else:
                delta = torch.bmm(delta, weight, out=workspace("backward", k, slope, slope.shape[-1])).mul_(slope)
    return grads, deltas, hidden


def _mlp_jvp(params: Params, acts: _Activations, direction: Params, workspace: _Workspace
             ) -> tuple[list[Tensor | None], list[Tensor | None], Tensor]:
    """Forward-mode derivative along ``direction``: of each layer's input (None for the observations),
    of each hidden pre-activation (kept only where the nonlinearity has curvature), and of the mean.
    The hidden ones live in ``workspace``."""
    layers = policies.num_layers(params)
    r_inputs: list[Tensor | None] = [None]
    r_pre: list[Tensor | None] = []
    r_h: Tensor | None = None
    for k in range(layers):
        hidden = k < layers - 1
        width = params[f"layers.{k}.bias"].shape[-1]
        out = _linear(acts.inputs[k], direction[f"layers.{k}.weight"], direction[f"layers.{k}.bias"],
                      workspace("pre", k, acts.inputs[k], width) if hidden else None)
        if not hidden:
            if r_h is not None:  # the narrow mean, transposed as _linear computes it
                out = out.mT.baddbmm_(params[f"layers.{k}.weight"], r_h.mT).mT
            return r_inputs, r_pre, out
        if r_h is not None:
            out = out.baddbmm_(r_h, params[f"layers.{k}.weight"].mT)
        if acts.curvatures[k] is None:
            r_pre.append(None)
            r_h = out.mul_(acts.slopes[k])
        else:
            r_pre.append(out)
            r_h = torch.mul(out, acts.slopes[k], out=workspace("hidden", k, out, width))
        r_inputs.append(r_h)
    raise AssertionError("unreachable")


def _stacked(params: Params, tasks: int) -> Params:
    return params if policies.is_stacked(params) else {k: v.expand(tasks, *v.shape) for k, v in params.items()}


def _split_steps(x: Tensor, obs_dim: int) -> tuple[Tensor, Tensor]:
    """``[T, B, H, do + da]`` -> observations ``[T, N, do]`` and actions ``[T, N, da]`` (contiguous)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return flat[..., :obs_dim].contiguous(), flat[..., obs_dim:].contiguous()


class _InnerStep:
    """One SGD policy-gradient step per task, linearised: its value and ``v -> (I - lr H_inner) v``."""

    def __init__(self, params: Params, batch: PolicyBatch, lr: float, settings: InnerSettings, obs_dim: int):
        tasks = batch.x.shape[0]
        self.params, self.lr, self.lvc = _stacked(params, tasks), lr, settings.estimator == "lvc"
        obs, actions = _split_steps(batch.x, obs_dim)
        adv, mask = batch.y[..., 0].reshape(tasks, -1), batch.y[..., 1].reshape(tasks, -1)
        self.weight = (adv * mask / mask.sum(1, keepdim=True).clamp_min(1)).unsqueeze(-1)  # [T, N, 1]
        self.acts = _mlp_forward(self.params, obs, settings.nonlinearity)
        self.inv_var = torch.exp(-2 * self.params["log_std"]).unsqueeze(1)  # [T, 1, da]
        self.resid = self.acts.mean - actions
        self.weighted = self.weight * self.inv_var  # [T, N, da]
        grads, deltas, hidden = _mlp_backward(self.params, self.acts, self.weighted * self.resid)
        self.deltas: list[Tensor | None] = [None, *deltas[1:]]  # the first layer's is not needed again
        # the backward signal's own derivative through a curved nonlinearity (tanh)
        self.hidden_curvature = [None if c is None else h * c for h, c in zip(hidden, self.acts.curvatures)]
        grads["log_std"] = (self.weight * (1 - self.resid * self.resid * self.inv_var)).sum(1)
        self.adapted = {k: v - lr * grads[k] for k, v in self.params.items()}
        self.workspace = _Workspace()

    def jacobian_product(self, direction: Params) -> Params:
        """``(I - lr H_i) d_i`` per task: a Hessian-vector product of the inner loss (symmetric, so this is
        also the transposed Jacobian's product)."""
        hv = self._hessian_product(direction)
        return {k: d - self.lr * hv[k] for k, d in direction.items()}

    def _hessian_product(self, direction: Params) -> Params:
        params, acts, workspace = self.params, self.acts, self.workspace
        layers = policies.num_layers(params)
        r_inputs, r_pre, r_mean = _mlp_jvp(params, acts, direction, workspace)
        d_log_std = direction["log_std"].unsqueeze(1)
        resid, inv_var, weighted = self.resid, self.inv_var, self.weighted
        # the REINFORCE loss -sum_n c_n log pi_n: its Hessian with respect to (mean, log_std), applied
        r_delta = weighted * (r_mean - 2 * resid * d_log_std)
        r_log_std = (weighted * resid * (2 * resid * d_log_std - 2 * r_mean)).sum(1)
        if self.lvc:
            # exp(log pi - stop_gradient(log pi)) adds -sum_n c_n s_n s_n^T (s_n the score) to the Hessian
            score = resid * inv_var
            centred = resid * score - 1
            r_logp = (centred * d_log_std - score * r_mean).sum(-1, keepdim=True)
            cr = self.weight * r_logp
            r_delta = r_delta + cr * score
            r_log_std = r_log_std - (cr * centred).sum(1)
        out: Params = {}
        for k in reversed(range(layers)):
            name = f"layers.{k}.weight"
            grad_w = _contract(r_delta, acts.inputs[k])
            r_input, delta = r_inputs[k], self.deltas[k]
            if r_input is not None and delta is not None:
                grad_w = grad_w + _contract(delta, r_input)
            out[name] = grad_w
            out[f"layers.{k}.bias"] = r_delta.sum(1)
            if k > 0:
                slope = acts.slopes[k - 1]
                r_hidden = workspace("backward", k, slope, slope.shape[-1])
                if r_delta.shape[-1] < slope.shape[-1]:  # narrow: one matmul over both terms
                    torch.bmm(torch.cat([r_delta, delta], -1), torch.cat([params[name], direction[name]], -2),
                              out=r_hidden)
                else:
                    torch.bmm(r_delta, params[name], out=r_hidden).baddbmm_(delta, direction[name])
                r_delta = r_hidden.mul_(slope)
                curvature = self.hidden_curvature[k - 1]
                if curvature is not None:
                    r_delta = r_delta.addcmul_(curvature, r_pre[k - 1])
        out["log_std"] = r_log_std
        return out


class OuterLinearization:
    """The TRPO step's derivatives at ``theta`` in closed form, for SGD inner steps on the Gaussian MLP.

    Gives the surrogate loss, its exact meta-gradient (at any ``theta``), and the Fisher-vector product
    ``v -> sum_i J_i^T F_i J_i v``, which equals the KL's Hessian when the adapted policies equal the
    sampling ones (``gauss_newton_exact``; otherwise use the double backward). First-order inner steps
    (``settings.first_order``, or a first-order product) take every ``J_i`` as the identity, as
    ``surrogate_and_kl(..., first_order=True)`` does.
    """

    def __init__(self, theta: Params, meta: MetaBatch, settings: InnerSettings, obs_dim: int):
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.first_order = settings.first_order
        tasks = meta.post.obs.shape[0]
        params = _stacked(self.theta, tasks)
        self.steps: list[_InnerStep] = []
        for lr, batch in zip(settings.lrs, meta.batches):
            self.steps.append(_InnerStep(params, batch, lr, settings, obs_dim))
            params = self.steps[-1].adapted
        self.adapted = params = _stacked(params, tasks)
        # the query episodes under the adapted policies
        post = meta.post
        mask = post.mask.reshape(tasks, -1)
        weight = (mask / mask.sum(1, keepdim=True).clamp_min(1) / tasks).unsqueeze(-1)  # [T, N, 1]
        obs = post.obs.reshape(tasks, -1, post.obs.shape[-1])
        actions = post.actions.reshape(tasks, -1, post.actions.shape[-1])
        self.acts = _mlp_forward(params, obs, settings.nonlinearity)
        self.workspace = _Workspace()
        log_std = params["log_std"]
        inv_var = torch.exp(-2 * log_std).unsqueeze(1)
        resid = self.acts.mean - actions
        logp = -0.5 * (resid * resid * inv_var).sum(-1) - log_std.sum(-1, keepdim=True) \
            - 0.5 * policies.LOG_2PI * actions.shape[-1]
        q = (weight.squeeze(-1) * torch.exp(logp - meta.old_logp.reshape(tasks, -1))
             * meta.post_adv.reshape(tasks, -1)).unsqueeze(-1)
        self.loss = -q.sum()
        self.loss_cotangent_mean = q * resid * inv_var
        self.loss_cotangent_log_std = (q * (1 - resid * resid * inv_var)).sum(1)
        # the KL term's Hessian with respect to (mean, log_std), at the adapted policies
        gap = self.acts.mean - meta.old_mean.reshape(self.acts.mean.shape)
        old_log_std = meta.old_log_std.reshape(log_std.shape)
        var_ratio = torch.exp(2 * (old_log_std - log_std)).unsqueeze(1)
        self.fisher_mean = weight * inv_var
        self.fisher_cross = -2 * self.fisher_mean * gap
        self.fisher_log_std = (weight * (2 * var_ratio + 2 * gap * gap * inv_var)).sum(1)
        # at the sampling policies the KL's gradient vanishes and the Gauss-Newton form is its exact Hessian
        eps = torch.finfo(log_std.dtype).eps
        alive = mask.unsqueeze(-1) > 0
        scale = 1 + meta.old_mean.abs().max().item() if meta.old_mean.numel() else 1.0
        self.gauss_newton_exact = bool(
            gap.abs().masked_fill(~alive, 0).max().item() <= 1e3 * eps * scale
            and (log_std - old_log_std).abs().max().item() <= 1e3 * eps * (1 + old_log_std.abs().max().item()))

    def _inner_jacobian(self, direction: Params, transpose: bool, first_order: bool = False) -> Params:
        if self.first_order or first_order:
            return direction
        for step in (reversed(self.steps) if transpose else self.steps):
            direction = step.jacobian_product(direction)
        return direction

    def _pull_back(self, per_task: Params, first_order: bool = False) -> Tensor:
        """``sum_i J_i^T u_i`` as a flat vector in ``theta``'s layout."""
        grads = self._inner_jacobian(per_task, transpose=True, first_order=first_order)
        return trpo.flatten({k: grads[k].sum(0) for k in self.theta})

    def gradient(self) -> Tensor:
        """The surrogate loss's gradient with respect to ``theta``."""
        grads, _, _ = _mlp_backward(self.adapted, self.acts, self.loss_cotangent_mean, self.workspace)
        grads["log_std"] = self.loss_cotangent_log_std
        return self._pull_back(grads)

    def fisher_vector_product(self, first_order: bool = False) -> Callable[[Tensor], Tensor]:
        return functools.partial(self.fvp, first_order=first_order)

    def fvp(self, v: Tensor, first_order: bool = False) -> Tensor:
        """``sum_i J_i^T F_i J_i v`` (``J_i`` the identity if ``first_order``)."""
        tasks = self.acts.mean.shape[0]
        direction = {k: d.expand(tasks, *d.shape) for k, d in trpo.unflatten(v, self.theta).items()}
        direction = self._inner_jacobian(direction, transpose=False, first_order=first_order)
        _, _, r_mean = _mlp_jvp(self.adapted, self.acts, direction, self.workspace)
        d_log_std = direction["log_std"]
        cotangent = self.fisher_mean * r_mean + self.fisher_cross * d_log_std.unsqueeze(1)
        fisher, _, _ = _mlp_backward(self.adapted, self.acts, cotangent, self.workspace)
        fisher["log_std"] = (self.fisher_cross * r_mean).sum(1) + self.fisher_log_std * d_log_std
        return self._pull_back(fisher, first_order)
