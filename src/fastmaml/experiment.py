"""Turns a :class:`Config` into the objects a run needs: model, learner, task sources.

The only module that knows every name a config may use; the trainer, evaluator and CLI ask it
for objects and stay independent of task families.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from fastmaml.config import Config, ConfigError
from fastmaml.episode import Episode
from fastmaml.learners import ANIL, COMPILE_MODES, MAML, PRECISIONS, MAMLPlusPlus, MetaSGD
from fastmaml.models import BatchNormMLP, ConvNet, batchnorm_parameter_names, sinusoid_mlp
from fastmaml.tasks.sinusoid import SinusoidTasks


class TaskSource(Protocol):
    def sample(self, num_tasks: int, generator: torch.Generator) -> Episode: ...


def is_classification(config: Config) -> bool:
    return config.task.name != "sinusoid"


def build_model(config: Config) -> nn.Module:
    name, ways = config.model.name, config.task.ways
    if name == "sinusoid_mlp":
        return sinusoid_mlp(config.model.hidden, config.model.init)
    if name == "conv":
        if config.task.name == "miniimagenet":  # the paper's MiniImagenet net: max-pool, 84x84 RGB
            return ConvNet(ways=ways, in_channels=3, filters=config.model.filters, pool=True, image_size=84,
                           bn_scale=config.model.bn_scale)
        return ConvNet(ways=ways, in_channels=1, filters=config.model.filters, pool=False, image_size=28,
                       bn_scale=config.model.bn_scale)
    if name == "bn_mlp":
        return BatchNormMLP(ways=ways, in_features=28 * 28, bn_scale=config.model.bn_scale)
    raise ConfigError(f"unknown model.name {name!r}; use sinusoid_mlp, conv or bn_mlp")


def build_learner(config: Config, device: torch.device) -> MAML:
    """The learner the config names; variants are the same learner with another rule or options."""
    meta = config.meta
    if meta.strategy not in ("auto", "vmap", "loop"):
        raise ConfigError(f"unknown meta.strategy {meta.strategy!r}; use auto, vmap or loop")
    if meta.precision not in PRECISIONS:
        raise ConfigError(f"unknown meta.precision {meta.precision!r}; use fp32 or bf16")
    if meta.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"unknown meta.compile_mode {meta.compile_mode!r}; use one of {', '.join(COMPILE_MODES)}")
    if meta.task_threads < 0:
        raise ConfigError(f"meta.task_threads must be >= 0 (0 = the plan's choice), got {meta.task_threads}")
    common = {
        "loss": "cross_entropy" if is_classification(config) else "mse",
        "reduction": meta.reduction,
        # checkpointing recomputes inner steps task by task: auto means the loop there
        "strategy": "loop" if meta.checkpoint and meta.strategy == "auto" else meta.strategy,
        "chunk_size": meta.chunk_size or None,
        "checkpoint": meta.checkpoint,
        "compile": meta.compile,
        "compile_mode": meta.compile_mode,
        "precision": meta.precision,
        "task_threads": meta.task_threads or None,
    }
    model = build_model(config)
    steps = meta.inner_steps
    if not meta.adapt_batchnorm and meta.algorithm in ("maml", "metasgd"):  # mamlpp and anil never adapt it
        frozen = set(batchnorm_parameter_names(model))
        common["adapted_names"] = [n for n, _ in model.named_parameters() if n not in frozen]
    if meta.algorithm == "maml":
        learner = MAML(model, meta.inner_lr, steps, meta.first_order, **common)
    elif meta.algorithm == "pretrain":
        learner = MAML(model, meta.inner_lr, 0, **common)
    elif meta.algorithm == "metasgd":
        learner = MetaSGD(model, meta.inner_lr, steps, meta.first_order, **common)
    elif meta.algorithm == "anil":
        learner = ANIL(model, meta.inner_lr, steps, first_order=meta.first_order, **common)
    elif meta.algorithm == "mamlpp":
        learner = MAMLPlusPlus(model, meta.inner_lr, steps, msl_iterations=meta.msl_iterations,
                               first_order_iterations=meta.first_order_iterations, per_step_bn=meta.per_step_bn,
                               learn_inner_lr=meta.learn_inner_lr, **common)
    else:
        raise ConfigError(f"unknown meta.algorithm {meta.algorithm!r}; use maml, metasgd, anil, mamlpp or pretrain")
    return learner.to(device)


def build_tasks(config: Config, split: str, device: torch.device, shots: int | None = None,
                queries: int | None = None) -> TaskSource:
    """A task source for ``split`` (train | val | test); ``shots``/``queries`` override training's."""
    task = config.task
    shots = task.shots if shots is None else shots
    queries = task.queries if queries is None else queries
    if task.name == "sinusoid":
        return SinusoidTasks(shots=shots, queries=queries, device=str(device))
    if task.name == "omniglot":
        from fastmaml.tasks.omniglot import build_omniglot_tasks

        return build_omniglot_tasks(task, split, shots=shots, queries=queries, device=device)
    if task.name == "miniimagenet":
        from fastmaml.tasks.miniimagenet import build_miniimagenet_tasks

        return build_miniimagenet_tasks(task, split, shots=shots, queries=queries, device=device)
    raise ConfigError(f"unknown task.name {task.name!r}; use sinusoid, omniglot or miniimagenet")


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu")
    return device
