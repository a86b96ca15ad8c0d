"""Few-shot classification from a folder of images in ImageFolder layout: ``root/<class>/<images>``.

Every subfolder of ``root`` is a class (named by the folder, hidden ones ignored); its images are
the Pillow-readable files (:data:`IMAGE_EXTENSIONS`) directly in it or in its subfolders, one
level down (deeper folders are not read). Classes may hold different numbers of images (see
:mod:`fastmaml.tasks.labelled` for how tasks are drawn from them). Other files are skipped and
counted; a file with an image extension that Pillow cannot decode is skipped too, and one
:class:`CorruptImagesWarning` gives their number and first names.

All images are decoded once, by a thread pool, converted to ``L`` (``channels=1``) or ``RGB``
(``channels=3``) and resized, whole image and no crop, to ``image_size`` x ``image_size`` with
Pillow's Lanczos filter (as the MAML code's MiniImagenet ``proc_images.py`` does; Pillow widens it
by the reduction factor, so downscales are antialiased). The uint8 store ``[n, C, S, S]`` is cached
as ``.npy`` (written atomically, with a small sidecar listing the undecodable files) under a key of
``image_size``, ``channels`` and every image's relative path, size and modification time: ``stat``
catches replaced, added, removed or renamed images for microseconds per file, where hashing the
bytes would cost as much as decoding. An edit that keeps both size and modification time is not
seen: delete the cache file to force a rebuild. The whole folder is cached, not one split, so
changing the split re-decodes nothing.

Example (a CUB-200-2011 download, with the split of Chen et al. 2019 shipped in fastmaml/splits):

>>> from fastmaml.tasks.labelled import LabelledTasks, read_class_split
>>> data = load_image_folder("CUB_200_2011/images", image_size=84, channels=3)  # doctest: +SKIP
>>> classes = read_class_split("cub_closer_look", data.names)["train"]  # doctest: +SKIP
>>> tasks = LabelledTasks(data, ways=5, shots=1, queries=15, classes=classes, device="cuda")  # doctest: +SKIP
>>> episode = tasks.sample(4, torch.Generator().manual_seed(0))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from fastmaml.storage import DiskFullError, read_cached_array, resolve_cache_dir, write_atomic
from fastmaml.tasks.labelled import (
    LabelledData,
    LabelledDataError,
    LabelledNotFoundError,
    LabelledTasks,
    shorten,
    task_class_split,
)

if TYPE_CHECKING:
    from fastmaml.config import TaskConfig

__all__ = [
    "CorruptImagesWarning",
    "FolderDataError",
    "FolderNotFoundError",
    "FolderListing",
    "build_folder_tasks",
    "decode_image",
    "load_image_folder",
    "scan_image_folder",
]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File name endings (any case) read as images; every other file is skipped."""
DEFAULT_IMAGE_SIZE = 84
DEFAULT_CHANNELS = 3
CHANNEL_MODES = {1: "L", 3: "RGB"}
LAYOUT_HELP = (
    "expected ImageFolder layout: DIR/<class name>/<image files>, images directly in each class folder or one "
    "folder below it, any Pillow-readable format"
)
_CACHE_VERSION = b"fastmaml-image-folder-store-v1"
_RESAMPLE = "lanczos"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class FolderDataError(LabelledDataError):
    """The image folder is unusable (wrong layout, an empty class folder, too few classes)."""


class FolderNotFoundError(FolderDataError, LabelledNotFoundError):
    """The image folder is not where the config points."""


class CorruptImagesWarning(UserWarning):
    """Some files with an image extension could not be decoded; they are left out."""


@dataclass(frozen=True)
class FolderListing:
    """What :func:`scan_image_folder` found: class names (sorted), each class's image files relative
    to ``root`` (sorted, ``/``-separated), their sizes and modification times, and the skipped files."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[tuple[str, ...], ...]
    stats: tuple[tuple[tuple[int, int], ...], ...]
    skipped: tuple[str, ...]

    @property
    def num_images(self) -> int:
        return sum(len(f) for f in self.files)

    def key(self, image_size: int, channels: int) -> str:
        """Hash of the decode settings and every image's relative path, size and modification time."""
        key = hashlib.sha256(_CACHE_VERSION)
        key.update(f"size={image_size};channels={channels};resample={_RESAMPLE}\n".encode())
        for name, files, stats in zip(self.classes, self.files, self.stats):
            key.update(f"class\0{name}\n".encode())
            for path, (size, mtime) in zip(files, stats):
                key.update(f"{path}\0{size}\0{mtime}\n".encode())
        return key.hexdigest()[:20]


def scan_image_folder(root: str | os.PathLike[str]) -> FolderListing:
    """List ``root``'s class folders and their image files; every layout problem is a :class:`FolderDataError`."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FolderNotFoundError(f"image folder {root} does not exist; set task.data_root to it ({LAYOUT_HELP})")
    if not root.is_dir():
        raise FolderDataError(f"{root} is a file, not a folder; set task.data_root to the image folder ({LAYOUT_HELP})")
    entries = sorted(_visible(root), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir()]
    loose = [e.name for e in entries if not e.is_dir()]
    if not class_dirs:
        found = (f"it holds {len(loose)} files but no folders" if loose else "it is empty")
        images = [n for n in loose if _is_image(n)]
        hint = (f"; its images ({shorten(images)}) must be sorted into one folder per class" if images else "")
        raise FolderDataError(f"image folder {root} has no class folders ({found}){hint}; {LAYOUT_HELP}")
    if len(class_dirs) == 1:
        only = class_dirs[0].path
        raise FolderDataError(
            f"image folder {root} has only one class folder ({only}), and a task needs several classes; if the "
            f"subfolders of {only} are the classes, set task.data_root to {only}; {LAYOUT_HELP}"
        )
    classes, files, stats, skipped = [], [], [], list(loose)
    for folder in class_dirs:
        found_files, found_stats, nested = [], [], False
        for entry in sorted(_visible(Path(folder.path)), key=lambda e: e.name):
            inner = [entry]
            if entry.is_dir():
                nested = True
                inner = sorted((e for e in _visible(Path(entry.path)) if not e.is_dir()), key=lambda e: e.name)
            for item in inner:
                relative = Path(item.path).relative_to(root).as_posix()
                if not _is_image(item.name):
                    skipped.append(relative)
                    continue
                info = item.stat()
                found_files.append(relative)
                found_stats.append((info.st_size, info.st_mtime_ns))
        if not found_files:
            hint = (f" (if its subfolders are the classes, set task.data_root to {folder.path})" if nested else "")
            raise FolderDataError(
                f"class folder {folder.path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}){hint}; put the "
                f"class's images in it or remove the folder; {LAYOUT_HELP}"
            )
        classes.append(folder.name)
        files.append(tuple(found_files))
        stats.append(tuple(found_stats))
    return FolderListing(root, tuple(classes), tuple(files), tuple(stats), tuple(skipped))


def load_image_folder(
    root: str | os.PathLike[str],
    image_size: int = DEFAULT_IMAGE_SIZE,
    channels: int = DEFAULT_CHANNELS,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    workers: int | None = None,
) -> LabelledData:
    """Every class of ``root`` as uint8 images ``[n, channels, image_size, image_size]``, decoded once then cached.

    ``workers`` threads decode (Pillow releases the GIL); ``None`` uses up to 8.
    """
    _check_settings(image_size, channels)
    listing = scan_image_folder(root)
    key = listing.key(image_size, channels)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", listing.root.resolve().name)[:40] or "folder"
    cache = resolve_cache_dir(cache_dir) / f"folder-{slug}-{channels}c{image_size}px-{key}.npy"
    bad_cache = cache.with_name(cache.stem + "-undecodable.npy")
    shape = (listing.num_images, channels, image_size, image_size)
    bad = read_cached_array(bad_cache, lambda a: a.dtype == np.int64 and a.ndim == 1)
    images = read_cached_array(cache, lambda a: a.dtype == np.uint8 and a.shape == shape) if bad is not None else None
    if images is None or bad is None:
        print(f"decoding {listing.num_images} images of {listing.root} once, cached at {cache}", file=sys.stderr,
              flush=True)
        if listing.skipped:
            print(f"skipped {len(listing.skipped)} non-image files in {listing.root}: {shorten(listing.skipped)}",
                  file=sys.stderr, flush=True)
        images, bad = _decode_all(listing, image_size, channels, workers)
        try:  # the undecodable list first: a complete store implies a complete list
            write_atomic(bad_cache, lambda f: np.save(f, bad))
            write_atomic(cache, lambda f: np.save(f, images))
        except DiskFullError:
            raise
        except OSError as exc:
            raise OSError(
                f"cannot write the image folder cache {cache} ({exc}); point FASTMAML_CACHE (or task.cache_dir) at "
                f"a writable folder"
            ) from exc
    return _as_data(listing, images, bad)


def decode_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 ``[channels, image_size, image_size]``: converted, then Lanczos-resized unless that size."""
    with Image.open(path) as image:
        converted = image.convert(CHANNEL_MODES[channels])
    if converted.size != (image_size, image_size):
        converted = converted.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def build_folder_tasks(
    task: TaskConfig | Any, split: str, *, shots: int, queries: int, device: torch.device | str
) -> LabelledTasks:
    """The task source a run config asks for (``task.name=folder``), over ``split``'s classes.

    Reads ``task.data_root`` (the folder), ``image_size`` (0 = 84), ``channels`` (0 = 3),
    ``split_file`` (empty = seeded split by ``split_seed``), ``rotation``, ``cache_dir``, ``ways`` and
    ``max_classes`` (0 = all; meta-train only).
    """
    root = getattr(task, "data_root", "") or ""
    if not root:
        raise FolderNotFoundError(f"task.name=folder needs task.data_root: the image folder ({LAYOUT_HELP})")
    image_size = int(getattr(task, "image_size", 0) or DEFAULT_IMAGE_SIZE)
    channels = int(getattr(task, "channels", 0) or DEFAULT_CHANNELS)
    data = load_image_folder(root, image_size, channels, cache_dir=getattr(task, "cache_dir", "") or None)
    classes = task_class_split(task, data.names, split)
    rotation = getattr(task, "rotation", "none") or "none"
    return LabelledTasks(data, task.ways, shots, queries, classes=classes, rotation=rotation, device=device,
                         where=f"split {split!r} of {root}")


def _check_settings(image_size: int, channels: int) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise FolderDataError(f"task.image_size must be a positive integer (0 = {DEFAULT_IMAGE_SIZE}), "
                              f"got {image_size!r}")
    if channels not in CHANNEL_MODES:
        raise FolderDataError(f"task.channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")


def _visible(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return [e for e in entries if not e.name.startswith(".")]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _decode_all(listing: FolderListing, image_size: int, channels: int,
                workers: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The store ``[n, C, S, S]`` in listing order (undecodable rows left zero) and those rows' indices."""
    paths = [listing.root / path for files in listing.files for path in files]
    images = np.zeros((len(paths), channels, image_size, image_size), dtype=np.uint8)

    def decode(i: int) -> bool:
        try:
            images[i] = decode_image(paths[i], image_size, channels)
        except _DECODE_ERRORS:
            return False
        return True

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1:
        ok = [decode(i) for i in range(len(paths))]
    else:
        with ThreadPoolExecutor(workers) as pool:
            ok = list(pool.map(decode, range(len(paths))))
    return images, np.flatnonzero(~np.array(ok, dtype=bool)).astype(np.int64)


def _as_data(listing: FolderListing, images: np.ndarray, bad: np.ndarray) -> LabelledData:
    """The decodable images grouped by class; one warning names the undecodable files."""
    counts = np.array([len(f) for f in listing.files], dtype=np.int64)
    if bad.size:
        if bad.min() < 0 or bad.max() >= images.shape[0]:
            raise FolderDataError(f"the image folder cache for {listing.root} is inconsistent; delete it and rerun")
        names = [path for files in listing.files for path in files]
        warnings.warn(
            f"{bad.size} of the {images.shape[0]} image files in {listing.root} could not be decoded and are left "
            f"out: {shorten([names[i] for i in bad.tolist()])}; replace or delete them",
            CorruptImagesWarning,
            stacklevel=3,
        )
        owner = np.repeat(np.arange(len(counts)), counts)
        counts = counts - np.bincount(owner[bad], minlength=len(counts))
        keep = np.ones(images.shape[0], dtype=bool)
        keep[bad] = False
        images = images[keep]
    return LabelledData(torch.from_numpy(images), torch.from_numpy(counts), listing.classes)
