"""Returns, the linear feature baseline of the original code, and advantages, batched over tasks.

Trajectories are padded arrays ``[T, B, H]`` (tasks, rollouts, time) with a ``mask`` that is 1
while an episode is alive, so every task's fit is one small least-squares solve and the whole
meta-batch is a handful of tensor operations instead of a Python loop over paths.
"""

from __future__ import annotations

import torch
from torch import Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over the last (time) dimension, zero past the end."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns * mask


def baseline_features(obs: Tensor, mask: Tensor) -> Tensor:
    """rllab's LinearFeatureBaseline features: clipped obs, its square, time polynomials, a constant.

    ``obs [..., H, d]`` -> ``[..., H, 2d + 4]``; time is ``t / 100`` as in the original code.
    """
    o = obs.clamp(-10, 10)
    steps = obs.shape[-2]
    t = torch.arange(steps, dtype=obs.dtype, device=obs.device) / 100.0
    t = t.view(*([1] * (obs.dim() - 2)), steps, 1).expand(*obs.shape[:-1], 1)
    features = torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)
    return features * mask.unsqueeze(-1)


def fit_linear_baseline(features: Tensor, targets: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Ridge regression per task, in float64: ``features [T, B, H, F]``, ``targets [T, B, H]`` -> ``[T, F]``.

    Like the original, the regulariser grows tenfold until the solution is finite.
    """
    x = (features * mask.unsqueeze(-1)).flatten(1, 2).double()
    y = (targets * mask).flatten(1, 2).double()
    gram = x.transpose(1, 2) @ x
    rhs = (x.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    for _ in range(5):
        weights = torch.linalg.solve(gram + reg * eye, rhs)
        if torch.isfinite(weights).all():
            return weights
        reg *= 10
    raise FloatingPointError("linear baseline fit is not finite even with a large regulariser; "
                             "check the observations for NaN or huge values")


def predict_baseline(features: Tensor, weights: Tensor) -> Tensor:
    """``features [T, B, H, F]`` @ ``weights [T, F]`` -> ``[T, B, H]``."""
    return torch.einsum("tbhf,tf->tbh", features.double(), weights).to(features.dtype)


def advantages(obs: Tensor, rewards: Tensor, mask: Tensor, gamma: float, normalize: bool = True) -> Tensor:
    """Discounted return minus the per-task linear baseline (GAE with lambda = 1, as the original),
    then centred and scaled per task over the alive steps (rllab's ``center_adv``)."""
    returns = discounted_returns(rewards, mask, gamma)
    features = baseline_features(obs, mask)
    weights = fit_linear_baseline(features, returns, mask)
    adv = (returns - predict_baseline(features, weights)) * mask
    if not normalize:
        return adv
    count = mask.sum(dim=(1, 2), keepdim=True).clamp_min(1)
    mean = adv.sum(dim=(1, 2), keepdim=True) / count
    var = (((adv - mean) * mask) ** 2).sum(dim=(1, 2), keepdim=True) / count
    return (adv - mean) / (var.sqrt() + 1e-8) * mask
