"""N-way K-shot classification episodes drawn from an in-memory image store, on its device.

The store is a uint8 tensor ``[classes, examples, H, W]`` or ``[classes, examples, C, H, W]``
that lives on the training device, so a meta-batch costs a few random draws and one gather per
side (support, query): no Python loop over tasks or images, no PIL, no DataLoader, no host to
device copy per step. All randomness comes from the ``torch.Generator`` passed to
:meth:`EpisodeSampler.sample`, so saving and restoring that generator resumes the exact stream.

Example (a random store of 10 classes, 6 examples each):

>>> import torch
>>> store = torch.randint(0, 256, (10, 6, 28, 28), dtype=torch.uint8)
>>> sampler = EpisodeSampler(store, ways=5, shots=1, queries=5)
>>> episode = sampler.sample(4, torch.Generator().manual_seed(0))
>>> episode.shapes()["support_x"], episode.shapes()["query_y"]
((4, 5, 1, 28, 28), (4, 25))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmaml.episode import Episode

ROTATIONS = ("none", "classes", "per_task")
"""Rotation protocols, by multiples of 90 degrees counter-clockwise (``torch.rot90`` on the last two dims).

``none``: images as stored. ``classes``: each (class, rotation) pair is its own class, so there
are 4x as many classes (most PyTorch reproductions of MAML). ``per_task``: each sampled class gets
one random rotation for all its images in that task (the original MAML TensorFlow code).
"""


@dataclass(frozen=True)
class EpisodeIndices:
    """Where every image of an episode comes from; :meth:`EpisodeSampler.gather` turns it into pixels.

    ``classes [T, N]`` store class ids, ``rotations [T, N]`` quarter turns (0..3), ``examples
    [T, N, shots + queries]`` example ids within each class (the first ``shots`` form the support),
    ``labels [T, N]`` the label (0..N-1) given to each sampled class.
    """

    classes: Tensor
    rotations: Tensor
    examples: Tensor
    labels: Tensor


class EpisodeSampler:
    """Samples ``ways``-way ``shots``-shot episodes with ``queries`` query images per class.

    ``classes`` restricts sampling to those store classes (a meta-train/val/test split); ``None``
    uses all. ``rotation`` is one of :data:`ROTATIONS`; with rotations the sampler keeps all four
    rotated copies of its classes (4x the split's memory) so sampling stays one gather.
    ``device`` defaults to the store's. Episodes hold ``dtype`` floats in [0, 1] (``uint8 / 255``)
    of shape ``[T, N*K, C, H, W]`` and int64 labels ``[T, N*K]``, grouped by class.
    """

    def __init__(
        self,
        store: Tensor,
        ways: int,
        shots: int,
        queries: int,
        classes: Tensor | Sequence[int] | None = None,
        rotation: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        images = _as_image_store(store)
        _check_counts(ways=ways, shots=shots, queries=queries)
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)}; got {rotation!r}")
        self.classes = _check_classes(classes, images.shape[0])
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rotation = rotation
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else store.device
        self.examples_per_class = images.shape[1]
        self.image_shape: tuple[int, ...] = tuple(images.shape[2:])
        self.num_classes = len(self.classes) * (4 if rotation == "classes" else 1)
        """Classes a task can draw from (rotated copies count as classes in ``classes`` mode)."""
        self._check_fits()
        selected = images.index_select(0, self.classes.to(images.device)).to(self.device)
        self._copies = 1 if rotation == "none" else 4
        self._flat = _with_rotations(selected, self._copies).reshape(-1, *self.image_shape)
        # store class id -> row of ``selected``; -1 for classes outside this sampler
        self._position = torch.full((images.shape[0],), -1, dtype=torch.long)
        self._position[self.classes] = torch.arange(len(self.classes))
        self._position = self._position.to(self.device)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"classes={len(self.classes)}, rotation={self.rotation!r}, image_shape={self.image_shape}, "
            f"device={self.device})"
        )

    def sample(self, num_tasks: int, generator: torch.Generator) -> Episode:
        """A meta-batch of ``num_tasks`` new tasks."""
        return self.gather(self.sample_indices(num_tasks, generator))

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> EpisodeIndices:
        """Draw classes, rotations, examples and labels, in that order, from ``generator``.

        Random numbers are drawn on the generator's device and the (small) index tensors moved
        to the sampler's, so a CPU generator can drive a CUDA store.
        """
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        T, N, E = num_tasks, self.ways, self.examples_per_class
        slots = _random_subsets(T, self.num_classes, N, generator)
        if self.rotation == "classes":
            positions, rotations = slots // 4, slots % 4
        elif self.rotation == "per_task":
            positions = slots
            rotations = torch.randint(0, 4, (T, N), generator=generator, device=generator.device)
        else:
            positions, rotations = slots, torch.zeros_like(slots)
        examples = _random_subsets(T * N, E, self.shots + self.queries, generator).view(T, N, -1)
        labels = _random_subsets(T, N, N, generator)
        classes = self.classes.to(generator.device)[positions]
        return EpisodeIndices(*(t.to(self.device) for t in (classes, rotations, examples, labels)))

    def gather(self, indices: EpisodeIndices) -> Episode:
        """The pixels and labels of the images ``indices`` names (one gather per side)."""
        T, N = indices.labels.shape
        positions = self._position[indices.classes]
        base = (positions * self._copies + indices.rotations) * self.examples_per_class
        flat = base.unsqueeze(-1) + indices.examples
        labels = indices.labels.unsqueeze(-1).expand(T, N, flat.shape[-1])
        support_x = self._pixels(flat[..., : self.shots])
        query_x = self._pixels(flat[..., self.shots :])
        support_y = labels[..., : self.shots].reshape(T, -1)
        query_y = labels[..., self.shots :].reshape(T, -1)
        return Episode(support_x, support_y, query_x, query_y)

    def _pixels(self, flat: Tensor) -> Tensor:
        T = flat.shape[0]
        return self._flat[flat.reshape(T, -1)].to(self.dtype).div_(255)

    def _check_fits(self) -> None:
        if self.ways > self.num_classes:
            extra = " (rotation='classes' counts each rotation as a class)" if self.rotation == "classes" else ""
            raise ValueError(
                f"ways={self.ways} but only {self.num_classes} classes are available{extra}; "
                f"lower ways or use a split with more classes"
            )
        if self.shots + self.queries > self.examples_per_class:
            raise ValueError(
                f"shots + queries = {self.shots} + {self.queries} but each class has only "
                f"{self.examples_per_class} examples, and support and query must not share an image; "
                f"lower shots or queries"
            )
        if self.rotation != "none" and self.image_shape[-1] != self.image_shape[-2]:
            raise ValueError(f"rotation={self.rotation!r} needs square images, got H x W = {self.image_shape[-2:]}")


def _as_image_store(store: Tensor) -> Tensor:
    """The store as ``[classes, examples, C, H, W]`` (a view; a channel dim is added if absent)."""
    if not isinstance(store, Tensor):
        raise TypeError(f"store must be a torch.Tensor, got {type(store).__name__}")
    if store.dtype != torch.uint8:
        raise TypeError(
            f"store must hold uint8 pixels (0..255), got {store.dtype}; convert floats in [0, 1] with "
            f"(x * 255).round().to(torch.uint8)"
        )
    if store.dim() not in (4, 5):
        raise ValueError(
            f"store must have shape [classes, examples, H, W] or [classes, examples, C, H, W], got {tuple(store.shape)}"
        )
    return store if store.dim() == 5 else store.unsqueeze(2)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_classes(classes: Tensor | Sequence[int] | None, available: int) -> Tensor:
    if classes is None:
        return torch.arange(available)
    ids = torch.as_tensor(classes).cpu()
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"classes must be a non-empty 1-D sequence of integer class ids, got {classes!r}")
    ids = ids.long()
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= available:
        raise ValueError(f"classes must lie in [0, {available}) for this store, got ids {low}..{high}")
    if ids.unique().numel() != ids.numel():
        raise ValueError("classes contains duplicate ids; a class listed twice could appear twice in one task")
    return ids


def _with_rotations(images: Tensor, rotations: int) -> Tensor:
    """``[K, R, E, C, H, W]``: copy ``r`` is ``torch.rot90(images, r)`` over the last two dims."""
    return torch.stack([torch.rot90(images, r, dims=(-2, -1)) for r in range(rotations)], dim=1).contiguous()


def _random_subsets(rows: int, population: int, size: int, generator: torch.Generator) -> Tensor:
    """``[rows, size]`` distinct ids from ``range(population)`` per row, in random order.

    The ids of the ``size`` largest of ``population`` uniform keys: the same draw as
    ``argsort(keys)[:, :size]`` but top-k is several times faster than a full sort of 4,400 keys.
    float64 keys, so ties (which would favour low ids) practically never occur.
    """
    keys = torch.rand(rows, population, generator=generator, device=generator.device, dtype=torch.float64)
    return keys.topk(size, dim=1).indices
