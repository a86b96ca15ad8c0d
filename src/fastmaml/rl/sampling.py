"""Roll out a meta-batch of policies in one process: all tasks x rollouts step together.

Each time step is one batched policy forward over ``[T, B]`` observations (per-task adapted
parameters stacked on a leading task dimension) and one call into the batched environment, so the
cost per step is a few array operations regardless of how many episodes run at once. On a 2-core
machine this beats worker processes, which would only add pickling and contention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastmaml.rl import policies
from fastmaml.rl.envs import BatchEnv
from fastmaml.rules import Params


@dataclass
class Trajectories:
    """Padded episodes of a meta-batch: ``obs [T, B, H, do]``, ``actions [T, B, H, da]``,
    ``rewards``/``mask [T, B, H]`` (mask 1 while the episode is alive)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    def episode_returns(self) -> Tensor:
        """Undiscounted return of each episode ``[T, B]`` (what the paper plots)."""
        return (self.rewards * self.mask).sum(-1)

    def steps(self) -> int:
        return int(self.mask.sum().item())

    def to(self, device: torch.device) -> Trajectories:
        return Trajectories(self.obs.to(device), self.actions.to(device), self.rewards.to(device),
                            self.mask.to(device))


@torch.no_grad()
def sample(env: BatchEnv, tasks: np.ndarray, params: Params, rollouts: int, rng: np.random.Generator,
           nonlinearity: str = "relu", device: torch.device | str = "cpu") -> Trajectories:
    """``rollouts`` episodes of each task in ``tasks [T, ...]`` under ``params``.

    ``params`` is one policy shared by every task or, stacked with a leading task dimension, one
    adapted policy per task. Exploration noise and the environments' initial states come from
    ``rng``, so saving its state makes sampling resumable exactly.
    """
    num_tasks = len(tasks)
    env.set_tasks(np.repeat(np.asarray(tasks), rollouts, axis=0))
    obs = env.reset(rng)
    horizon, obs_dim, act_dim = env.horizon, env.observation_dim, env.action_dim
    stacked = policies.is_stacked(params)
    params = {k: v.detach().to(device) for k, v in params.items()}
    mean_fn = policies.batched(lambda p, o: policies.action_mean(p, o, nonlinearity), stacked)
    std = torch.exp(params["log_std"]).view(num_tasks if stacked else 1, 1, act_dim).cpu().double().numpy()

    all_obs = np.zeros((horizon, num_tasks * rollouts, obs_dim))
    all_actions = np.zeros((horizon, num_tasks * rollouts, act_dim))
    all_rewards = np.zeros((horizon, num_tasks * rollouts))
    all_mask = np.zeros((horizon, num_tasks * rollouts))
    alive = np.ones(num_tasks * rollouts, dtype=bool)
    dtype = params["log_std"].dtype
    for t in range(horizon):
        obs_t = torch.as_tensor(obs, dtype=dtype, device=device).view(num_tasks, rollouts, obs_dim)
        mean = mean_fn(params, obs_t).double().cpu().numpy()
        noise = rng.standard_normal((num_tasks, rollouts, act_dim))
        action = (mean + std * noise).reshape(num_tasks * rollouts, act_dim)
        all_obs[t], all_actions[t], all_mask[t] = obs, action, alive
        obs, reward, done = env.step(action)
        all_rewards[t] = np.where(alive, reward, 0.0)
        alive = alive & ~np.asarray(done, dtype=bool)
        if not alive.any():
            break

    def arrange(array: np.ndarray) -> Tensor:  # [H, T*B, ...] -> [T, B, H, ...]
        array = array.reshape(horizon, num_tasks, rollouts, *array.shape[2:])
        return torch.as_tensor(np.moveaxis(array, 0, 2).copy(), dtype=dtype, device=device)

    return Trajectories(arrange(all_obs), arrange(all_actions), arrange(all_rewards), arrange(all_mask))
