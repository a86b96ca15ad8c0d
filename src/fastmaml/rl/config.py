"""Typed configuration of a meta-RL run (same YAML, overrides and error messages as supervised runs).

A YAML file with a top-level ``env`` section is an RL config; everything else is supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastmaml.config import (
    ConfigError,
    Device,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    apply_overrides,
    build_config,
    read_yaml,
)
from fastmaml.rl.metarl import OuterSettings

ENVS = ("navigation2d", "halfcheetah_vel", "halfcheetah_dir", "ant_vel", "ant_dir")


@dataclass
class EnvSection:
    name: str = "navigation2d"
    """navigation2d | halfcheetah_vel | halfcheetah_dir | ant_vel | ant_dir."""
    frame_skip: NonNegativeInt = 0
    """MuJoCo simulator steps per action (0 = gymnasium's 5; 1 = the original code's time step)."""
    squared_distance: bool = False
    """navigation2d: reward minus the squared distance (the paper's text) instead of the distance (its code)."""


@dataclass
class PolicySection:
    hidden: list[PositiveInt] = field(default_factory=lambda: [100, 100])
    """Hidden layer sizes of the Gaussian MLP policy (the paper: 2 x 100)."""
    nonlinearity: str = "relu"
    """relu (the paper) | tanh."""
    init_std: PositiveFloat = 1.0
    """Initial action standard deviation (state-independent, learned)."""


@dataclass
class RLMetaSection:
    algorithm: str = "maml"
    """maml | pretrain (TRPO on the mixture of tasks, no inner step: the paper's pretrained baseline)."""
    inner_lr: NonNegativeFloat = 0.1
    """Inner policy-gradient step size alpha."""
    inner_steps: int = 1
    """Inner steps in meta-training (each resamples with the policy adapted so far)."""
    first_order: bool = False
    """Drop the inner step's second derivatives in the meta-gradient."""
    estimator: str = "reinforce"
    """Inner loss: reinforce (the paper) | lvc (ProMP's low-variance curvature)."""
    gamma: float = 0.99
    """Discount factor."""


OuterSection = OuterSettings
"""The outer step's settings are the config section itself (one definition, in metarl)."""


@dataclass
class RLTrainSection:
    iterations: PositiveInt = 100
    """Meta-iterations (outer updates)."""
    meta_batch: PositiveInt = 20
    """Tasks per meta-iteration."""
    rollouts: PositiveInt = 20
    """Episodes per task per sampling phase."""
    seed: NonNegativeInt = 0
    """Seed of the initial policy, the task stream and all sampling noise."""
    device: Device = "cpu"
    """cpu | cuda (the policy and the meta-step; environments step on the CPU)."""
    threads: NonNegativeInt = 1
    """torch CPU threads."""
    checkpoint_every: PositiveInt = 10
    """Meta-iterations between checkpoints (one is always written at the end)."""


@dataclass
class RLEvalSection:
    tasks: PositiveInt = 40
    """Test tasks (the paper: 40), fixed by ``seed``."""
    steps: NonNegativeInt = 3
    """Report returns after 0..steps policy-gradient steps."""
    rollouts: PositiveInt = 20
    """Episodes per task per step."""
    later_lr_scale: NonNegativeFloat = 0.5
    """Step size of steps 2+ relative to alpha (the paper: alpha, then alpha / 2)."""
    seed: NonNegativeInt = 1234
    """Seed of the test tasks and their sampling."""


@dataclass
class RLConfig:
    name: str = "navigation2d"
    """Experiment name (run directory prefix)."""
    env: EnvSection = field(default_factory=EnvSection)
    policy: PolicySection = field(default_factory=PolicySection)
    meta: RLMetaSection = field(default_factory=RLMetaSection)
    outer: OuterSection = field(default_factory=OuterSection)
    train: RLTrainSection = field(default_factory=RLTrainSection)
    eval: RLEvalSection = field(default_factory=RLEvalSection)


CHOICES = {
    "env.name": ENVS,
    "policy.nonlinearity": ("relu", "tanh"),
    "meta.algorithm": ("maml", "pretrain"),
    "meta.estimator": ("reinforce", "lvc"),
    "outer.method": ("trpo", "ppo"),
    "outer.hvp": ("exact", "finite-difference", "first-order"),
}


def is_rl_config(data: dict[str, Any]) -> bool:
    return "env" in data


def validate(config: RLConfig) -> RLConfig:
    """Reject values outside their choices, naming the key and the valid values."""
    for key, valid in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in valid:
            raise ConfigError(f"config key {key!r} is {value!r}; valid: {', '.join(valid)}")
    if config.meta.inner_steps < 0 or (config.meta.algorithm == "maml" and config.meta.inner_steps == 0):
        raise ConfigError("meta.inner_steps must be >= 1 for maml (use meta.algorithm=pretrain for none)")
    return config


def load_rl_config(name_or_path: str, overrides: list[str] | None = None) -> RLConfig:
    data, path = read_yaml(name_or_path)
    if not is_rl_config(data):
        raise ConfigError(f"{path} has no 'env' section: it is not a meta-RL config")
    return validate(apply_overrides(build_config(RLConfig, data, source=str(path)), overrides or []))
