"""N-way K-shot classification from any labelled examples: arrays, a ``Dataset``, or an image folder.

Examples are grouped by class into one flat store ``[n, ...]`` (class ``c`` holds rows
``offsets[c] : offsets[c] + counts[c]``), so classes may differ in size, which a dense
``[classes, examples, ...]`` store cannot hold. uint8 stores are images (episodes get ``x / 255``);
float stores are features, served as they are, so the same source works for non-image data.

Sampling is :class:`fastmaml.tasks.episodes.EpisodeSampler`'s, made ragged: per task ``ways``
distinct classes, per class ``shots + queries`` distinct examples drawn as the top-k of random keys
with the keys of rows past the class's count masked out, and a label permutation, all in a few
batched draws on the device, then one gather per side. With equal class sizes nothing is masked and
the draws, hence the episodes, are exactly EpisodeSampler's for the same generator. A class with
fewer than ``shots + queries`` examples cannot fill a task: one :class:`SmallClassesWarning` lists
those of the split and the rest are used; fewer than ``ways`` usable classes is an error.

Classes are split into meta-train/val/test by name: ``sorted(names)`` shuffled with
``random.Random(seed)`` and cut 64/16/20 % (the same on every machine), or by a YAML/JSON split
file with ``train``, ``val`` and ``test`` lists of class names (see :func:`read_class_split`;
shipped files: :data:`SHIPPED_SPLITS`).

Example (30 classes of 4 to 9 random 8x8 images, string labels):

>>> import numpy as np, torch
>>> rng = np.random.default_rng(0)
>>> y = [f"class{c}" for c in range(30) for _ in range(4 + c % 6)]
>>> x = rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8)
>>> data = LabelledData.from_arrays(x, y)
>>> splits = split_classes(data.names, seed=0)
>>> tasks = LabelledTasks(data, ways=5, shots=1, queries=3, classes=splits["train"])
>>> episode = tasks.sample(4, torch.Generator().manual_seed(0))
>>> episode.shapes()["support_x"], episode.shapes()["query_y"], tasks.input_shape
((4, 5, 1, 8, 8), (4, 15), (1, 8, 8))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastmaml.episode import Episode
from fastmaml.tasks.episodes import ROTATIONS, EpisodeIndices
from fastmaml.tasks.splits import (  # noqa: F401 - re-exported: the folder source's public names
    DEFAULT_FRACTIONS,
    SHIPPED_SPLITS,
    SPLITS,
    read_split_file,
    resolve_split_file,
    seeded_split,
    shorten,
)

_SHOWN = 5
"""Names listed in a message before ``...``."""


class LabelledDataError(ValueError):
    """Labelled examples or their split are unusable as given (bad shape, unknown class, too few classes)."""


class LabelledNotFoundError(LabelledDataError, FileNotFoundError):
    """A data folder or split file is not where the config points."""


class SmallClassesWarning(UserWarning):
    """Some classes have fewer examples than one task needs; they are left out."""


# --- examples grouped by class --------------------------------------------------------------


@dataclass(frozen=True)
class LabelledData:
    """Examples grouped by class, on the CPU: ``examples [n, ...]``, ``counts [classes]``, ``names``.

    Class ``c`` (named ``names[c]``) holds rows ``offsets[c] : offsets[c] + counts[c]``. uint8
    examples are images ``[n, C, H, W]`` (a channel dim is added to ``[n, H, W]``); float examples
    are features of any shape.
    """

    examples: Tensor
    counts: Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.counts.dim() != 1 or len(self.names) != self.counts.numel():
            raise LabelledDataError(f"{len(self.names)} class names for {self.counts.numel()} class counts")
        if len(set(self.names)) != len(self.names):
            raise LabelledDataError("class names must be distinct")
        if int(self.counts.sum()) != self.examples.shape[0]:
            raise LabelledDataError(f"class counts add up to {int(self.counts.sum())}, not {self.examples.shape[0]}")

    @property
    def offsets(self) -> Tensor:
        """First row of each class."""
        return torch.cumsum(self.counts, 0) - self.counts

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.examples.shape[1:])

    @classmethod
    def from_arrays(cls, x: Any, y: Iterable[Any]) -> LabelledData:
        """From ``x [n, ...]`` (tensor or array) and ``n`` integer or string labels.

        Classes are ordered by label (numerically for integers), examples within a class as in ``x``.
        """
        examples = _as_examples(x)
        keys, names = _label_keys(y, examples.shape[0])
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
        counts = torch.from_numpy(np.bincount(keys, minlength=len(names)).astype(np.int64))
        return cls(examples.index_select(0, order), counts, tuple(names))

    @classmethod
    def from_dataset(cls, dataset: torch.utils.data.Dataset) -> LabelledData:
        """From any map-style ``Dataset`` whose items are ``(x, label)``; ``x`` a tensor, array or PIL image.

        Every item is read once (no cache: a Dataset has no stable identity to key one by).
        """
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise LabelledDataError(f"the dataset must have a length (a map-style Dataset), got {dataset!r}") from exc
        if size == 0:
            raise LabelledDataError("the dataset is empty")
        xs, ys = [], []
        for i in range(size):
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise LabelledDataError(f"dataset item {i} must be a pair (x, label), got {type(item).__name__}")
            xs.append(_item_array(item[0], i))
            ys.append(item[1].item() if isinstance(item[1], Tensor) else item[1])
        shapes = {a.shape for a in xs}
        if len(shapes) != 1:
            raise LabelledDataError(
                f"dataset items have different shapes ({shorten(sorted(map(str, shapes)))}); resize them to one "
                f"shape in the dataset's transform"
            )
        return cls.from_arrays(np.stack(xs), ys)


def _as_examples(x: Any) -> Tensor:
    """``x`` as a CPU tensor: uint8 images ``[n, C, H, W]`` or float features ``[n, ...]``."""
    if isinstance(x, Tensor):
        examples = x.detach().cpu()
    else:
        array = np.ascontiguousarray(np.asarray(x))
        if array.dtype.kind not in "uif":
            raise LabelledDataError(
                f"x must be a numeric array [n, ...] (uint8 images or float features), got dtype {array.dtype}; "
                f"stack the examples into one array of one shape"
            )
        examples = torch.from_numpy(array)
    if examples.dim() < 2 or examples.shape[0] == 0:
        raise LabelledDataError(f"x must have shape [n, ...] with n >= 1 examples, got {tuple(examples.shape)}")
    if examples.dtype == torch.uint8:
        if examples.dim() == 3:
            return examples.unsqueeze(1)
        if examples.dim() != 4:
            raise LabelledDataError(
                f"uint8 x must be images [n, H, W] or [n, C, H, W], got {tuple(examples.shape)}; "
                f"pass features as floats"
            )
        if examples.shape[-1] in (1, 3, 4) and examples.shape[1] not in (1, 3, 4):
            raise LabelledDataError(
                f"uint8 x of shape {tuple(examples.shape)} looks channels-last [n, H, W, C]; pass channels first: "
                f"x.transpose(0, 3, 1, 2) (numpy) or x.permute(0, 3, 1, 2) (torch)"
            )
        return examples
    if examples.is_floating_point():
        return examples
    raise LabelledDataError(
        f"x must hold uint8 pixels (0..255) or float features, got {examples.dtype}; convert it, e.g. "
        f"x.astype(np.uint8) for images or x.astype(np.float32) for features"
    )


def _item_array(x: Any, index: int) -> np.ndarray:
    """One Dataset input as an array: tensors and arrays as they are, a PIL image as uint8 ``[C, H, W]``."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "getbands"):  # a PIL image: channels first, like the folder store
        pixels = np.asarray(x)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    raise LabelledDataError(f"dataset item {index}: x must be a tensor, array or PIL image, got {type(x).__name__}")


def _label_keys(y: Iterable[Any], count: int) -> tuple[np.ndarray, list[str]]:
    """Class index of every label and the class names, in label order (numeric for integers)."""
    labels = list(y.tolist() if isinstance(y, (Tensor, np.ndarray)) else y)
    if len(labels) != count:
        raise LabelledDataError(f"{len(labels)} labels for {count} examples; give one label per example")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        classes: list[Any] = sorted(set(int(v) for v in labels))
        index = {v: i for i, v in enumerate(classes)}
        keys = np.array([index[int(v)] for v in labels], dtype=np.int64)
    elif all(isinstance(v, str) for v in labels):
        classes = sorted(set(labels))
        index = {v: i for i, v in enumerate(classes)}
        keys = np.array([index[v] for v in labels], dtype=np.int64)
    else:
        kinds = sorted({type(v).__name__ for v in labels})
        raise LabelledDataError(f"labels must be all integers or all strings, got {', '.join(kinds)}")
    return keys, [str(c) for c in classes]


# --- class splits ---------------------------------------------------------------------------


def split_classes(
    names: Sequence[str], seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, list[str]]:
    """Disjoint meta-train/val/test classes (:func:`fastmaml.tasks.splits.seeded_split`)."""
    return seeded_split(names, seed, fractions, units="classes", error=LabelledDataError)


def read_class_split(path: str | os.PathLike[str], known: Sequence[str]) -> dict[str, list[str]]:
    """The class lists of a split file (:func:`fastmaml.tasks.splits.read_split_file`)."""
    return read_split_file(path, known, units="classes", error=LabelledDataError, missing=LabelledNotFoundError,
                           fix="Fix the names or point task.data_root at the folder whose class folders they name")


def task_class_split(task: Any, names: Sequence[str], split: str) -> list[str]:
    """The classes of ``split`` a run config asks for: ``task.split_file`` if set, else seeded by
    ``task.split_seed``; ``task.max_classes`` (> 0) keeps the first meta-train classes only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    split_file = getattr(task, "split_file", "") or ""
    if split_file:
        classes = read_class_split(split_file, names)[split]
    else:
        classes = split_classes(names, seed=int(getattr(task, "split_seed", 0) or 0))[split]
    max_classes = int(getattr(task, "max_classes", 0) or 0)
    if split == "train" and max_classes > 0:
        classes = classes[:max_classes]
    return classes


# --- sampling -------------------------------------------------------------------------------


class LabelledTasks:
    """``ways``-way ``shots``-shot episodes with ``queries`` query examples per class, from ragged classes.

    ``classes`` (names or indices into ``data.names``; ``None`` = all) is the split to draw from;
    ``where`` names it in messages (e.g. ``"split 'train' of data/cub"``).
    ``rotation`` is one of :data:`fastmaml.tasks.episodes.ROTATIONS` (square images only; the four
    rotated copies are stored, 4x the split's memory, so sampling stays one gather). Episodes hold
    ``dtype`` ``[T, N*K, *input_shape]`` inputs (uint8 images as ``x / 255`` in [0, 1], float
    features as stored) and int64 labels ``[T, N*K]`` grouped by class, like EpisodeSampler's.
    """

    def __init__(
        self,
        data: LabelledData,
        ways: int,
        shots: int,
        queries: int,
        classes: Sequence[str] | Sequence[int] | Tensor | None = None,
        rotation: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        where: str = "",
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)}; got {rotation!r}")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rotation, self.dtype = rotation, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.input_shape: tuple[int, ...] = data.input_shape
        """Shape of one example, e.g. ``(C, H, W)``: what a model's input layer must take."""
        self.images = data.examples.dtype == torch.uint8
        where = where or "the given classes"
        ids = _class_ids(data, classes)
        counts = data.counts[ids]
        need = shots + queries
        small = [f"{data.names[i]} ({n})" for i, n in zip(ids.tolist(), counts.tolist()) if n < need]
        if small:
            warnings.warn(
                f"{len(small)} of the {len(ids)} classes of {where} have fewer than shots + queries = {need} "
                f"examples and are left out: {shorten(small)}",
                SmallClassesWarning,
                stacklevel=2,
            )
        ids = ids[counts >= need]
        self.class_names: tuple[str, ...] = tuple(data.names[i] for i in ids.tolist())
        """Names of the classes tasks draw from, in the order given."""
        self._check_fits(len(ids), where, need)
        self._copies = 1 if rotation == "none" else 4
        self.num_classes = len(ids) * (4 if rotation == "classes" else 1)
        """Classes a task can draw from (rotated copies count as classes in ``classes`` mode)."""
        self._counts = data.counts[ids]
        self._width = int(self._counts.max())
        self._ragged = bool((self._counts != self._width).any())
        offsets = torch.cumsum(self._counts, 0) - self._counts
        total = int(self._counts.sum())
        rows = torch.repeat_interleave(data.offsets[ids] - offsets, self._counts) + torch.arange(total)
        selected = data.examples.index_select(0, rows).to(self.device)
        self._total = selected.shape[0]
        self._flat = torch.cat([torch.rot90(selected, r, dims=(-2, -1)) for r in range(self._copies)]) \
            if self._copies > 1 else selected
        self._offsets = offsets.to(self.device)
        self._counts_on: dict[torch.device, Tensor] = {torch.device("cpu"): self._counts}

    def __repr__(self) -> str:
        return (
            f"LabelledTasks(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"classes={len(self.class_names)}, rotation={self.rotation!r}, input_shape={self.input_shape}, "
            f"device={self.device})"
        )

    def sample(self, num_tasks: int, generator: torch.Generator) -> Episode:
        """A meta-batch of ``num_tasks`` new tasks."""
        return self.gather(self.sample_indices(num_tasks, generator))

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> EpisodeIndices:
        """Draw classes, rotations, examples and labels, in that order (EpisodeSampler's), from ``generator``.

        ``classes`` are positions in :attr:`class_names`. Random numbers are drawn on the generator's
        device and the small index tensors moved to the sampler's.
        """
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        T, N, gen_device = num_tasks, self.ways, generator.device
        slots = _random_subsets(T, self.num_classes, N, generator)
        if self.rotation == "classes":
            positions, rotations = slots // 4, slots % 4
        elif self.rotation == "per_task":
            positions = slots
            rotations = torch.randint(0, 4, (T, N), generator=generator, device=gen_device)
        else:
            positions, rotations = slots, torch.zeros_like(slots)
        keys = torch.rand(T * N, self._width, generator=generator, device=gen_device, dtype=torch.float64)
        if self._ragged:  # rows past a class's count can never be among the top shots + queries keys
            counts = self._counts_on_device(gen_device)[positions].view(-1, 1)
            keys.masked_fill_(torch.arange(self._width, device=gen_device) >= counts, -1.0)
        examples = keys.topk(self.shots + self.queries, dim=1).indices.view(T, N, -1)
        labels = _random_subsets(T, N, N, generator)
        return EpisodeIndices(*(t.to(self.device) for t in (positions, rotations, examples, labels)))

    def gather(self, indices: EpisodeIndices) -> Episode:
        """The inputs and labels of the examples ``indices`` names (one gather per side)."""
        T, N = indices.labels.shape
        base = self._offsets[indices.classes] + indices.rotations * self._total
        flat = base.unsqueeze(-1) + indices.examples
        labels = indices.labels.unsqueeze(-1).expand(T, N, flat.shape[-1])
        return Episode(
            self._inputs(flat[..., : self.shots]),
            labels[..., : self.shots].reshape(T, -1),
            self._inputs(flat[..., self.shots :]),
            labels[..., self.shots :].reshape(T, -1),
        )

    def _inputs(self, flat: Tensor) -> Tensor:
        x = self._flat[flat.reshape(flat.shape[0], -1)].to(self.dtype)
        return x.div_(255) if self.images else x

    def _counts_on_device(self, device: torch.device) -> Tensor:
        if device not in self._counts_on:
            self._counts_on[device] = self._counts.to(device)
        return self._counts_on[device]

    def _check_fits(self, usable: int, where: str, need: int) -> None:
        classes = usable * (4 if self.rotation == "classes" else 1)
        if self.ways > classes:
            extra = " (rotation='classes' counts each rotation as a class)" if self.rotation == "classes" else ""
            raise LabelledDataError(
                f"ways={self.ways} but {where} has only {classes} classes with at least shots + queries = {need} "
                f"examples{extra}; lower ways, shots or queries, or put more classes in the split"
            )
        if self.rotation != "none" and (len(self.input_shape) < 2 or self.input_shape[-1] != self.input_shape[-2]):
            raise LabelledDataError(
                f"rotation={self.rotation!r} needs square images, got examples of shape {self.input_shape}; "
                f"set task.rotation=none"
            )


def _class_ids(data: LabelledData, classes: Sequence[str] | Sequence[int] | Tensor | None) -> Tensor:
    """``classes`` as int64 indices into ``data.names`` (names looked up; unknown or repeated ones are errors)."""
    if classes is None:
        return torch.arange(len(data.names))
    items = classes.tolist() if isinstance(classes, Tensor) else list(classes)
    if not items:
        raise LabelledDataError("the split has no classes; give it some (task.split_file) or use more data")
    if all(isinstance(c, str) for c in items):
        index = {name: i for i, name in enumerate(data.names)}
        unknown = [c for c in items if c not in index]
        if unknown:
            raise LabelledDataError(f"unknown class name(s) {shorten(unknown)}; the data has {shorten(data.names)}")
        ids = [index[c] for c in items]
    elif all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in items):
        ids = [int(c) for c in items]
        bad = [i for i in ids if not 0 <= i < len(data.names)]
        if bad:
            raise LabelledDataError(f"class ids {shorten(list(map(str, bad)))} are outside 0..{len(data.names) - 1}")
    else:
        raise LabelledDataError(f"classes must be all names or all integer ids, got {items[:_SHOWN]!r}")
    if len(set(ids)) != len(ids):
        raise LabelledDataError("classes lists a class twice; a class listed twice could appear twice in one task")
    return torch.tensor(ids, dtype=torch.long)


def _random_subsets(rows: int, population: int, size: int, generator: torch.Generator) -> Tensor:
    """``[rows, size]`` distinct ids from ``range(population)`` per row: EpisodeSampler's draw (top-k of keys)."""
    keys = torch.rand(rows, population, generator=generator, device=generator.device, dtype=torch.float64)
    return keys.topk(size, dim=1).indices
