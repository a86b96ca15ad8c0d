"""The one data structure that crosses from task sources into the core."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(frozen=True)
class Episode:
    """A meta-batch of tasks: plain tensors with a leading task dimension ``T``.

    ``support_x [T, S, ...]``, ``support_y [T, S, ...]``, ``query_x [T, Q, ...]``,
    ``query_y [T, Q, ...]``. Construction checks the shapes, so a malformed batch fails where it
    enters, not deep inside ``vmap``: at least one task and one support example (an empty support
    set has no gradient to adapt with). The query set may be empty (``Q = 0``), for an episode
    that only feeds :meth:`fastmaml.MAML.adapt` (the sinusoid plots draw such); what scores the
    query set calls :meth:`require_queries`.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Tensor):
                raise TypeError(f"Episode.{f.name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() < 2:
                raise ValueError(
                    f"Episode.{f.name} needs a task and an example dimension, got shape {tuple(value.shape)}"
                )
        tasks = {getattr(self, f.name).shape[0] for f in fields(self)}
        if len(tasks) != 1:
            raise ValueError(f"Episode tensors disagree on the number of tasks: {self.shapes()}")
        if tasks == {0}:
            raise ValueError(f"Episode has no tasks (T = 0): {self.shapes()}; sample at least one task")
        if self.support_x.shape[1] == 0:
            raise ValueError(f"Episode has an empty support set (0 support examples per task): {self.shapes()}; "
                             "the inner loop adapts on the support set, so sample shots >= 1")
        if self.support_x.shape[:2] != self.support_y.shape[:2]:
            raise ValueError(f"support_x and support_y disagree on [tasks, examples]: {self.shapes()}")
        if self.query_x.shape[:2] != self.query_y.shape[:2]:
            raise ValueError(f"query_x and query_y disagree on [tasks, examples]: {self.shapes()}")
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(f"support and query inputs have different example shapes: {self.shapes()}")
        if self.support_y.shape[2:] != self.query_y.shape[2:]:
            raise ValueError(f"support and query targets have different example shapes: {self.shapes()}")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def require_queries(self, use: str) -> None:
        """Raise unless every task has a query example: ``use`` (e.g. ``"meta_loss"``) scores them."""
        if self.query_x.shape[1] == 0:
            raise ValueError(
                f"{use} needs query examples, but the Episode has an empty query set (0 query examples per "
                f"task): {self.shapes()}; sample queries >= 1 (an episode without queries only serves adapt)"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {f.name: tuple(getattr(self, f.name).shape) for f in fields(self)}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Episode:
        """Move to ``device``; ``dtype`` converts the floating-point tensors only (labels stay ints)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return Episode(*(move(getattr(self, f.name)) for f in fields(self)))

    def task(self, index: int | slice) -> Episode:
        """A sub-batch of tasks (a slice keeps the task dimension; ``-1`` is the last task)."""
        if isinstance(index, int):
            if not -self.num_tasks <= index < self.num_tasks:
                raise IndexError(f"task {index} is out of range for an Episode of {self.num_tasks} tasks")
            index %= self.num_tasks
            index = slice(index, index + 1)
        return Episode(*(getattr(self, f.name)[index] for f in fields(self)))
