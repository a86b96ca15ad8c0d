"""The task-source protocol the trainer relies on, and how a user's own Python plugs into a config.

A task source is any object with ``sample(num_tasks, generator) -> Episode``:

- ``num_tasks`` tasks, each a support and a query set (:class:`fastmaml.Episode`: tensors with a
  leading task dimension, already on the training device);
- every random draw comes from ``generator`` (a ``torch.Generator`` on that device), so saving its
  state resumes the exact task stream, and validation and test tasks are the same for every model;
- optionally ``input_shape`` (one example's shape, e.g. ``(3, 84, 84)``), which lets the built-in
  models (``conv``, ``mlp``) size themselves to the data.

The trainer asks for one source per split (``train``, ``val``, ``test``) with the support and query
sizes of that use (training's, or each ``eval.shots``). From a config, ``task.name: python`` with
``task.factory: "package.module:function"`` calls ``function(config, split, shots, queries, device)``;
``model.name: python`` with ``model.factory`` calls ``function(config)`` for any ``nn.Module``.
The module must be importable (installed, or on ``PYTHONPATH``; the current folder is searched too).

Example (a factory a user might write in ``my_tasks.py``):

>>> import torch
>>> from fastmaml import Episode
>>> class LineTasks:  # y = a * x with a random slope per task
...     input_shape = (1,)
...     def __init__(self, shots, queries):
...         self.shots, self.queries = shots, queries
...     def sample(self, num_tasks, generator):
...         a = torch.rand(num_tasks, 1, 1, generator=generator) * 4 - 2
...         x = torch.rand(num_tasks, self.shots + self.queries, 1, generator=generator)
...         y = a * x
...         k = self.shots
...         return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
>>> def line_tasks(config, split, shots, queries, device):
...     return LineTasks(shots, queries)
>>> line_tasks(None, "train", 5, 5, "cpu").sample(3, torch.Generator().manual_seed(0)).shapes()["query_y"]
(3, 5, 1)
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fastmaml.config import ConfigError
from fastmaml.episode import Episode


@runtime_checkable
class TaskSource(Protocol):
    """Anything that samples meta-batches of tasks (see the module docstring)."""

    def sample(self, num_tasks: int, generator: torch.Generator) -> Episode: ...


def import_factory(spec: str, key: str) -> Callable[..., Any]:
    """The callable named by ``"module:function"``; every failure names ``key`` and the fix."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{key} must look like 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a factory beside the user's config, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name!r} ({error}); install it, or run from the "
                          "folder that holds it, or add that folder to PYTHONPATH") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"{key}={spec!r}: module {module_name!r} has no {attribute!r}")
    if not callable(factory):
        raise ConfigError(f"{key}={spec!r}: {attribute!r} is a {type(factory).__name__}, not a function")
    return factory


def python_tasks(config: Any, split: str, shots: int, queries: int, device: torch.device) -> TaskSource:
    """The source ``task.factory`` builds for ``split``, checked against the protocol."""
    spec = config.task.factory
    if not spec:
        raise ConfigError("task.name=python needs task.factory='package.module:function'")
    source = import_factory(spec, "task.factory")(config, split, shots, queries, device)
    if not isinstance(source, TaskSource):
        raise ConfigError(f"task.factory={spec!r} returned a {type(source).__name__} for split {split!r}; it must "
                          "return an object with a sample(num_tasks, generator) -> fastmaml.Episode method")
    return source


def python_model(config: Any) -> nn.Module:
    """The module ``model.factory`` builds, checked to be an ``nn.Module``."""
    spec = config.model.factory
    if not spec:
        raise ConfigError("model.name=python needs model.factory='package.module:function'")
    model = import_factory(spec, "model.factory")(config)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory={spec!r} returned a {type(model).__name__}; it must return a "
                          "torch.nn.Module")
    return model
