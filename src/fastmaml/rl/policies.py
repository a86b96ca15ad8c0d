"""Gaussian MLP policies as pure functions over parameter dicts.

The policy is the paper's: an MLP (2 x 100 ReLU) giving the mean of a diagonal Gaussian over
actions, with a learned state-independent log standard deviation. Everything is a function of a
parameter dict, like the supervised core, so the inner policy-gradient step is
``torch.func.grad`` of a loss over these functions and a meta-batch of adapted policies is the
same dict with a leading task dimension (one batched forward per time step while sampling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastmaml.rules import Params

LOG_2PI = math.log(2 * math.pi)
NONLINEARITIES = {"relu": torch.relu, "tanh": torch.tanh}


def init_policy(observation_dim: int, action_dim: int, hidden: tuple[int, ...] | list[int] = (100, 100),
                init_std: float = 1.0, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> Params:
    """Glorot-uniform weights and zero biases (as rllab's policies), log-std = log(init_std)."""
    sizes = [observation_dim, *hidden, action_dim]
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight = torch.rand(fan_out, fan_in, generator=generator, dtype=dtype) * 2 * bound - bound
        params[f"layers.{i}.weight"] = weight
        params[f"layers.{i}.bias"] = torch.zeros(fan_out, dtype=dtype)
    params["log_std"] = torch.full((action_dim,), math.log(init_std), dtype=dtype)
    return params


def num_layers(params: Params) -> int:
    return sum(1 for name in params if name.endswith(".weight"))


def action_mean(params: Params, obs: Tensor, nonlinearity: str = "relu") -> Tensor:
    """Mean action for ``obs [..., observation_dim]`` under ONE parameter set."""
    act = NONLINEARITIES[nonlinearity]
    layers = num_layers(params)
    h = obs
    for i in range(layers):
        h = torch.nn.functional.linear(h, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
        if i < layers - 1:
            h = act(h)
    return h


def log_prob(params: Params, obs: Tensor, actions: Tensor, nonlinearity: str = "relu") -> Tensor:
    """log pi(a | s) for each ``[..., action_dim]`` action (summed over action dimensions)."""
    mean = action_mean(params, obs, nonlinearity)
    log_std = params["log_std"]
    z = (actions - mean) * torch.exp(-log_std)
    return -0.5 * (z * z).sum(-1) - log_std.sum() - 0.5 * LOG_2PI * actions.shape[-1]


def kl_from_old(old_mean: Tensor, old_log_std: Tensor, params: Params, obs: Tensor,
                nonlinearity: str = "relu") -> Tensor:
    """KL(pi_old(.|s) || pi_params(.|s)) per state: the trust region's measure (as TRPO)."""
    mean = action_mean(params, obs, nonlinearity)
    log_std = params["log_std"]
    var_ratio = torch.exp(2 * (old_log_std - log_std))
    diff = (old_mean - mean) * torch.exp(-log_std)
    return 0.5 * (var_ratio + diff * diff - 1).sum(-1) + (log_std - old_log_std).sum(-1)


def batched(fn, stacked: bool):  # noqa: ANN001, ANN201
    """``fn(params, *tensors)`` over tasks: vmapped when ``params`` carries a task dimension.

    With shared (unstacked) parameters the tensors' leading task dimension simply broadcasts.
    """
    return torch.func.vmap(fn) if stacked else fn


def is_stacked(params: Params) -> bool:
    """Whether ``params`` carries a leading task dimension (``log_std`` is 1-D when it does not)."""
    return params["log_std"].dim() == 2
