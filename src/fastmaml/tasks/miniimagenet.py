"""MiniImagenet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split, as in the MAML paper.

100 ImageNet classes, 600 images each: 64 classes for meta-training, 16 for meta-validation, 20
for meta-test. Each split is decoded once into its own uint8 store ``[classes, 600, 3, 84, 84]``,
so ``build_tasks(config, "val")`` can only draw validation classes. Two layouts are read, from
``root`` or ``root/miniimagenet``:

* **csv**: ``images/`` holding the JPEGs, and the split files ``train.csv``, ``val.csv``,
  ``test.csv`` (header ``filename,label``) beside it or in ``splits/``. Every image is converted
  to RGB (ImageNet holds some greyscale and CMYK JPEGs) and resized to 84x84 with Pillow's
  Lanczos filter, whole image, no crop: the original MAML code's ``proc_images.py`` does
  ``im.resize((84, 84), resample=Image.LANCZOS)``. Pillow widens the filter by the reduction
  factor, so the downscale is antialiased; images already 84x84 are kept as they are.
* **pickle**: ``mini-imagenet-cache-train.pkl`` / ``-val.pkl`` / ``-test.pkl``, each a pickled
  dict with ``image_data`` (uint8 ``[n, 84, 84, 3]``) and ``class_dict`` (class name -> indices
  into ``image_data``), the widely shared cache files. Unpickling can run code: load only files
  you trust; afterwards the ``.npy`` cache (read without pickle) is used.

If both layouts are present the csv one is used (pass ``layout="pickle"`` to choose). Classes
are ordered by name (the ImageNet wnid), images by file name (csv) or in ``class_dict`` order
(pickle), so the store is the same on every machine; for the real files both orders are the
split files' own. Every class must hold the same number of images (a store has one example
count); a class that differs is an error naming it. Tasks are never rotated.

The decoded store is cached as ``.npy`` (written atomically) under a key of: the split file's
bytes plus, for every image, its name, size and modification time (csv), or the pickle's name,
size and modification time. Reading 60,000 JPEGs to hash them would cost as much as decoding
them; ``stat`` costs microseconds per file and catches replaced, added, removed or renamed
images, as ``make`` and ``rsync`` do. An edit that keeps both size and modification time is not
seen: delete the cache file to force a rebuild.

Example (needs the data; ``root`` may hold it directly or in a ``miniimagenet/`` subfolder):

>>> store = load_miniimagenet("data", "train")  # doctest: +SKIP
>>> store.shape  # doctest: +SKIP
torch.Size([64, 600, 3, 84, 84])
>>> tasks = EpisodeSampler(store, ways=5, shots=1, queries=15)  # doctest: +SKIP
>>> episode = tasks.sample(4, torch.Generator().manual_seed(0))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import stat
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastmaml.storage import cached_array, resolve_cache_dir
from fastmaml.tasks.episodes import EpisodeSampler

if TYPE_CHECKING:
    from fastmaml.config import TaskConfig

SPLITS = ("train", "val", "test")
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
"""Classes per split in the Ravi & Larochelle split files."""
IMAGES_PER_CLASS = 600
IMAGE_SIZE = 84
PICKLE_FILES = {split: f"mini-imagenet-cache-{split}.pkl" for split in SPLITS}
"""The pickle layout's file per split."""
CSV_HEADER = ["filename", "label"]
LAYOUTS = ("auto", "csv", "pickle")
LAYOUT_HELP = (
    "MiniImagenet is read from DIR (or DIR/miniimagenet) in either layout: "
    "(a) csv: DIR/images/ holding the JPEGs, with the Ravi & Larochelle split files train.csv, val.csv, "
    "test.csv (header filename,label) in DIR or DIR/splits; "
    "(b) pickle: DIR/mini-imagenet-cache-train.pkl, -val.pkl, -test.pkl, each a pickled dict with "
    "'image_data' (uint8 [n, 84, 84, 3]) and 'class_dict' (class name -> list of indices into image_data). "
    "Pass DIR as task.data_root=DIR (fastmaml train / eval) or set FASTMAML_DATA=DIR"
)
_CACHE_VERSION = b"fastmaml-miniimagenet-store-v1"
_RESAMPLE = "lanczos"


class MiniImagenetDataError(ValueError):
    """The MiniImagenet files are unusable (wrong layout, unequal classes, undecodable image)."""


class MiniImagenetNotFoundError(MiniImagenetDataError, FileNotFoundError):
    """The MiniImagenet files are not where the user pointed."""


@dataclass(frozen=True)
class MiniImagenetSource:
    """Where one split comes from: ``layout`` csv (``path`` the split csv, ``images`` the JPEG
    folder) or pickle (``path`` the ``.pkl``, ``images`` None)."""

    split: str
    layout: str
    path: Path
    images: Path | None = None


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, or else the ``FASTMAML_DATA`` environment variable."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("FASTMAML_DATA", "")
    if not env:
        raise MiniImagenetNotFoundError(f"no data folder given. {LAYOUT_HELP}")
    return Path(env).expanduser()


def find_miniimagenet(root: str | os.PathLike[str], split: str, layout: str = "auto") -> MiniImagenetSource:
    """The files of ``split`` in ``root``, else ``root/miniimagenet``; in each, csv before pickle with ``auto``."""
    _check_split(split)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    root = Path(root).expanduser()
    folders = (root, root / "miniimagenet")
    problems = []
    for folder in folders:
        images = folder / "images"
        csvs = [p for p in (folder / f"{split}.csv", folder / "splits" / f"{split}.csv") if p.is_file()]
        if layout in ("auto", "csv"):
            if csvs and images.is_dir():
                return MiniImagenetSource(split, "csv", csvs[0], images)
            if csvs:
                problems.append(f"found {csvs[0]} but no images/ folder {images}")
            elif images.is_dir():
                problems.append(f"found {images} but no {split}.csv in {folder} or {folder / 'splits'}")
        if layout in ("auto", "pickle") and (folder / PICKLE_FILES[split]).is_file():
            return MiniImagenetSource(split, "pickle", folder / PICKLE_FILES[split])
    wanted = {
        "auto": f"images/ + {split}.csv or {PICKLE_FILES[split]}",
        "csv": f"images/ + {split}.csv",
        "pickle": PICKLE_FILES[split],
    }[layout]
    found = f" ({'; '.join(problems)})" if problems else ""
    raise MiniImagenetNotFoundError(
        f"MiniImagenet {split} split not found: no {wanted} in {folders[0]} or {folders[1]}{found}. {LAYOUT_HELP}"
    )


def read_split_csv(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """A split file as ``{label: [filename, ...]}``, labels and file names sorted, counts checked."""
    path = Path(path)
    return _parse_split_csv(_read_bytes(path), path)


def miniimagenet_classes(root: str | os.PathLike[str] | None, split: str, layout: str = "auto") -> list[str]:
    """Class names of ``split`` in store order (the pickle layout unpickles its whole file)."""
    source = find_miniimagenet(resolve_data_root(root), split, layout)
    if source.layout == "csv":
        return list(read_split_csv(source.path))
    return list(_pickle_classes(source.path))


def load_miniimagenet(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    layout: str = "auto",
    workers: int | None = None,
) -> Tensor:
    """The uint8 store ``[classes, images, 3, 84, 84]`` of ``split``, decoded once then cached.

    ``workers`` threads decode JPEGs (Pillow releases the GIL); ``None`` uses up to 8.
    """
    source = find_miniimagenet(resolve_data_root(root), split, layout)
    key = _csv_key(source) if source.layout == "csv" else _pickle_key(source)
    cache = resolve_cache_dir(cache_dir) / f"miniimagenet-{split}-{IMAGE_SIZE}px-{_RESAMPLE}-{source.layout}-{key}.npy"
    store = cached_array(cache, _valid_store, lambda: decode_miniimagenet(source, workers), "MiniImagenet")
    return torch.from_numpy(store)


def decode_miniimagenet(source: MiniImagenetSource, workers: int | None = None) -> np.ndarray:
    """Decode one split into ``uint8 [classes, images, 3, 84, 84]`` (no cache)."""
    if source.layout == "csv":
        assert source.images is not None
        return _decode_images(source, read_split_csv(source.path), workers)
    return _decode_pickle(source.path)


def build_miniimagenet_tasks(
    task: TaskConfig, split: str, *, shots: int, queries: int, device: torch.device | str
) -> EpisodeSampler:
    """The task source a run config asks for, over ``split``'s own classes.

    ``task.max_classes`` keeps the first classes of the meta-train split only. ``task.rotation``
    is ignored: MiniImagenet tasks are never rotated (natural images, as in the original code).
    """
    _check_split(split)
    store = load_miniimagenet(task.data_root or None, split, cache_dir=task.cache_dir or None)
    classes = None
    if split == "train" and task.max_classes > 0:
        classes = torch.arange(min(task.max_classes, store.shape[0]))
    return EpisodeSampler(store, task.ways, shots, queries, classes=classes, rotation="none", device=device)


# --- csv layout -------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise MiniImagenetNotFoundError(f"{path} does not exist. {LAYOUT_HELP}") from exc


def _parse_split_csv(data: bytes, path: Path) -> dict[str, list[str]]:
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MiniImagenetDataError(f"{path} is not a readable csv file ({exc}). {LAYOUT_HELP}") from exc
    rows = [row for row in rows if row]
    if not rows or [cell.strip() for cell in rows[0]] != CSV_HEADER:
        first = rows[0] if rows else "nothing"
        raise MiniImagenetDataError(
            f"{path} must start with the header line 'filename,label' (Ravi & Larochelle split file), "
            f"found {first!r}. {LAYOUT_HELP}"
        )
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise MiniImagenetDataError(f"{path}, row {line}: expected 'filename,label', found {','.join(row)!r}")
        name, label = row[0].strip(), row[1].strip()
        if name in seen:
            raise MiniImagenetDataError(f"{path}, row {line}: {name} is listed twice")
        seen.add(name)
        groups.setdefault(label, []).append(name)
    if not groups:
        raise MiniImagenetDataError(f"{path} lists no images. {LAYOUT_HELP}")
    classes = {label: sorted(names) for label, names in sorted(groups.items())}
    _check_equal_counts({label: len(names) for label, names in classes.items()}, str(path))
    return classes


def _check_equal_counts(counts: Mapping[str, int], where: str) -> None:
    """Every class must hold as many images as the most common count (the store is not ragged)."""
    common = Counter(counts.values()).most_common(1)[0][0]
    if common == 0:
        raise MiniImagenetDataError(f"{where}: the classes list no images; restore the complete data set")
    odd = [f"{name} has {count}" for name, count in counts.items() if count != common]
    if odd:
        raise MiniImagenetDataError(
            f"{where}: class {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''} images, but the other classes "
            f"have {common}; every class needs the same number (the real split has {IMAGES_PER_CLASS} per class), "
            f"so a file is missing or extra: restore the complete data set"
        )


def _csv_key(source: MiniImagenetSource) -> str:
    """Hash of the split file's bytes and every listed image's name, size and mtime; checks they all exist."""
    assert source.images is not None
    data = _read_bytes(source.path)
    classes = _parse_split_csv(data, source.path)
    key = hashlib.sha256(_CACHE_VERSION)
    key.update(f"split={source.split};size={IMAGE_SIZE};resample={_RESAMPLE};layout=csv\n".encode())
    key.update(data)
    missing = []
    for names in classes.values():
        for name in names:
            try:
                info = os.stat(source.images / name)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(name)
                continue
            if not stat.S_ISREG(info.st_mode):
                missing.append(name)
                continue
            key.update(f"{name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    if missing:
        total = sum(len(names) for names in classes.values())
        raise MiniImagenetNotFoundError(
            f"{len(missing)} of the {total} images listed in {source.path} are missing from {source.images}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Put every image of the split files "
            f"in images/ (flat, named as in the csv). {LAYOUT_HELP}"
        )
    return key.hexdigest()[:20]


def _decode_images(source: MiniImagenetSource, classes: Mapping[str, list[str]], workers: int | None) -> np.ndarray:
    assert source.images is not None
    paths = [source.images / name for names in classes.values() for name in names]
    count = len(next(iter(classes.values())))
    store = np.empty((len(classes), count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    flat = store.reshape(len(paths), 3, IMAGE_SIZE, IMAGE_SIZE)

    def decode(i: int) -> None:
        flat[i] = _decode_image(paths[i])

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1:
        for i in range(len(paths)):
            decode(i)
        return store
    pool = ThreadPoolExecutor(workers)
    try:
        for _ in pool.map(decode, range(len(paths))):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a bad image stops the rest at once
    return store


def _decode_image(path: Path) -> np.ndarray:
    """One image as ``uint8 [3, 84, 84]``: RGB, then Lanczos-resized to 84x84 unless already that size."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        pixels = np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise MiniImagenetDataError(
            f"{path} is not a decodable image ({exc}); replace it with the data set's original file"
        ) from exc
    return pixels.transpose(2, 0, 1)


# --- pickle layout ----------------------------------------------------------------------------


def _pickle_key(source: MiniImagenetSource) -> str:
    info = source.path.stat()
    key = hashlib.sha256(_CACHE_VERSION)
    key.update(f"split={source.split};size={IMAGE_SIZE};resample={_RESAMPLE};layout=pickle\n".encode())
    key.update(f"{source.path.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return key.hexdigest()[:20]


def _load_pickle(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``image_data`` and ``class_dict`` (indices as int64 arrays), with the layout checked."""
    try:
        with open(path, "rb") as f:
            try:
                data: Any = pickle.load(f)
            except UnicodeDecodeError:  # written by Python 2: numpy asks for latin1
                f.seek(0)
                data = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ImportError, ValueError) as exc:
        raise MiniImagenetDataError(f"{path} is not a readable pickle ({exc}); it is truncated or corrupt") from exc
    if not isinstance(data, Mapping):
        raise MiniImagenetDataError(
            f"{path} holds a {type(data).__name__}, expected a dict with 'image_data' and 'class_dict'. {LAYOUT_HELP}"
        )
    missing = [key for key in ("image_data", "class_dict") if key not in data]
    if missing:
        raise MiniImagenetDataError(
            f"{path} has no {' or '.join(map(repr, missing))} key (it has {sorted(map(str, data))}). {LAYOUT_HELP}"
        )
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        described = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise MiniImagenetDataError(
            f"{path}: 'image_data' must be a uint8 array [n, 84, 84, 3], got {described}. {LAYOUT_HELP}"
        )
    if not isinstance(class_dict, Mapping) or not class_dict:
        raise MiniImagenetDataError(f"{path}: 'class_dict' must be a non-empty dict class -> indices. {LAYOUT_HELP}")
    classes: dict[str, np.ndarray] = {}
    owner = np.full(images.shape[0], -1, dtype=np.int64)
    for c, name in enumerate(sorted(class_dict, key=str)):
        indices = np.asarray(class_dict[name]).reshape(-1)
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise MiniImagenetDataError(f"{path}: class {name} lists indices that are not integers ({indices.dtype})")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= images.shape[0]):
            raise MiniImagenetDataError(
                f"{path}: class {name} lists indices outside image_data (0..{images.shape[0] - 1})"
            )
        if (owner[indices] >= 0).any() or np.unique(indices).size != indices.size:
            raise MiniImagenetDataError(f"{path}: class {name} lists an image that is listed twice")
        owner[indices] = c
        classes[str(name)] = indices
    _check_equal_counts({name: idx.size for name, idx in classes.items()}, str(path))
    return images, classes


def _pickle_classes(path: Path) -> list[str]:
    return list(_load_pickle(path)[1])


def _decode_pickle(path: Path) -> np.ndarray:
    images, classes = _load_pickle(path)
    count = len(next(iter(classes.values())))
    store = np.empty((len(classes), count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for c, indices in enumerate(classes.values()):
        if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
            store[c] = images[indices].transpose(0, 3, 1, 2)
        else:
            for e, i in enumerate(indices):
                small = Image.fromarray(images[i]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
                store[c, e] = np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)
    return store


# --- cache ------------------------------------------------------------------------------------


def _valid_store(array: np.ndarray) -> bool:
    """Whether a cached array has the store's dtype and layout."""
    return array.dtype == np.uint8 and array.ndim == 5 and array.shape[2:] == (3, IMAGE_SIZE, IMAGE_SIZE)
