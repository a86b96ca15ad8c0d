"""Turns a :class:`Config` into the objects a run needs: model, learner, task sources.

The only module that knows every name a config may use; the trainer, evaluator and CLI ask it
for objects and stay independent of task families.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastmaml.config import Config, ConfigError
from fastmaml.learners import ANIL, MAML, MAMLPlusPlus, MetaSGD
from fastmaml.models import BatchNormMLP, ConvNet, ResNet12, batchnorm_parameter_names, mlp, sinusoid_mlp
from fastmaml.tasks.protocol import TaskSource, python_model, python_tasks
from fastmaml.tasks.sinusoid import SinusoidTasks


def is_classification(config: Config) -> bool:
    if config.task.kind != "auto":
        return config.task.kind == "classification"
    return config.task.name not in ("sinusoid", "table")


def input_shape(config: Config) -> tuple[int, ...]:
    """One example's shape for the configured task (read from the data only for tables and Python sources)."""
    task = config.task
    fixed = {"sinusoid": (1,), "omniglot": (1, 28, 28), "miniimagenet": (3, 84, 84), "cifar_fs": (3, 32, 32),
             "fc100": (3, 32, 32)}
    if task.name in fixed:
        return fixed[task.name]
    if task.name == "folder":
        size = task.image_size or 84
        return (task.channels or 3, size, size)
    if task.name == "table":
        from fastmaml.tasks.table import table_input_shape

        return table_input_shape(task)
    shape = getattr(build_tasks(config, "train", torch.device("cpu")), "input_shape", None)
    if shape is None:
        raise ConfigError(f"model.name={config.model.name} needs the task source's input_shape, which the source of "
                          f"task.factory={task.factory!r} does not have; add it, or use model.name=python")
    return tuple(shape)


def build_model(config: Config) -> nn.Module:
    name, ways = config.model.name, config.task.ways
    if name == "python":
        return python_model(config)
    if name == "sinusoid_mlp":
        return sinusoid_mlp(config.model.hidden, config.model.init)
    outputs = 1 if not is_classification(config) else ways
    shape = input_shape(config)
    if name == "mlp":
        return mlp(math.prod(shape), config.model.hidden, outputs, config.model.init)
    if len(shape) != 3:
        raise ConfigError(f"model.name={name} needs images, but task.name={config.task.name} gives examples of "
                          f"shape {shape}; use model.name=mlp")
    channels, size = shape[0], shape[-1]
    if name == "resnet12":
        widths = tuple(round(config.model.filters * m) for m in (1, 2.5, 5, 10))
        return ResNet12(ways=outputs, in_channels=channels, widths=widths, bn_scale=config.model.bn_scale)
    if name == "conv":  # the paper's Omniglot net up to 28x28 (stride 2), its MiniImagenet net above (max-pool)
        pool = size > 28
        return ConvNet(ways=outputs, in_channels=channels, filters=config.model.filters, pool=pool, image_size=size,
                       bn_scale=config.model.bn_scale)
    return BatchNormMLP(ways=outputs, in_features=math.prod(shape), bn_scale=config.model.bn_scale)


def build_learner(config: Config, device: torch.device) -> MAML:
    """The learner the config names; variants are the same learner with another rule or options."""
    meta = config.meta
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
        raise AssertionError(meta.algorithm)  # config.py admits only the names above
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
    if task.name in ("cifar_fs", "fc100"):
        from fastmaml.tasks.cifar import build_cifar_tasks

        return build_cifar_tasks(task, split, shots=shots, queries=queries, device=device)
    if task.name == "folder":
        from fastmaml.tasks.folder import build_folder_tasks

        return build_folder_tasks(task, split, shots=shots, queries=queries, device=device)
    if task.name == "table":
        from fastmaml.tasks.table import build_table_tasks

        return build_table_tasks(task, split, shots=shots, queries=queries, device=device)
    return python_tasks(config, split, shots, queries, device)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu")
    return device
