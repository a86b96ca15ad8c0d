"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100.

Both benchmarks split CIFAR-100's 100 fine classes three ways and keep all 600 images of each class
(the archive's ``train`` and ``test`` files pooled). CIFAR-FS draws 64 / 16 / 20 classes at random;
FC100 splits by superclass, 12 / 4 / 4 of the 20, so no superclass is shared between splits. The
class lists ship with fastmaml as ``fastmaml/splits/cifar_fs.yaml`` and ``fc100.yaml``, with their
sources in the header comments.

The data is the official CIFAR-100 python archive (https://www.cs.toronto.edu/~kriz/cifar.html),
read from ``root`` or ``root/cifar100``: the extracted folder ``cifar-100-python/`` (pickles
``train``, ``test``, ``meta``) if present, else ``cifar-100-python.tar.gz``, read in place (never
extracted). ``root`` is ``task.data_root`` or, if empty, ``FASTMAML_DATA``.

It is decoded once into one uint8 store ``[100, 600, 3, 32, 32]``, classes in fine label order
(the archive's ``fine_label_names``, alphabetical), each class's images in file order: ``train``
then ``test``. The store is shared by both benchmarks and all splits, cached as ``.npy`` under the
SHA-256 of the archive (or of the three pickles), so a replaced file is always seen; hashing the
161 MB archive takes a fraction of a second.

The pickles are Python 2 pickles, and unpickling can run code. They are read with a restricted
unpickler that only rebuilds numpy arrays and dtypes, so a tampered file fails with an error
instead of running anything; the contents are then checked (keys, shapes, label ranges, the 100
fine and 20 coarse names, every class's superclass). Tasks are never rotated.

The shipped splits need no data:

>>> splits = read_splits("fc100")
>>> len(splits.classes["train"]), sorted(splits.superclasses["test"])
(60, ['aquatic_mammals', 'insects', 'medium_mammals', 'people'])
>>> class_ids(read_splits("cifar_fs").classes["val"])[:4].tolist()  # store rows: fine label ids
[4, 7, 14, 15]

Example (needs the archive in ``data/`` or ``data/cifar100/``):

>>> store = load_cifar100("data")  # doctest: +SKIP
>>> store.shape  # doctest: +SKIP
torch.Size([100, 600, 3, 32, 32])
>>> classes = class_ids(read_splits("fc100").classes["test"])  # doctest: +SKIP
>>> tasks = EpisodeSampler(store, ways=5, shots=1, queries=15, classes=classes)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import Tensor

from fastmaml.storage import cached_array, resolve_cache_dir
from fastmaml.tasks.episodes import EpisodeSampler

if TYPE_CHECKING:
    from fastmaml.config import TaskConfig

__all__ = [
    "BENCHMARKS",
    "COARSE_LABELS",
    "FINE_LABELS",
    "CifarDataError",
    "CifarNotFoundError",
    "CifarSource",
    "Splits",
    "build_cifar_tasks",
    "class_ids",
    "decode_cifar100",
    "find_cifar100",
    "load_cifar100",
    "read_pickle",
    "read_splits",
    "resolve_data_root",
]

BENCHMARKS = ("cifar_fs", "fc100")
SPLITS = ("train", "val", "test")
SPLIT_CLASSES = {"cifar_fs": {"train": 64, "val": 16, "test": 20}, "fc100": {"train": 60, "val": 20, "test": 20}}
"""Fine classes per split."""
SPLIT_SUPERCLASSES = {"train": 12, "val": 4, "test": 4}
"""FC100's superclasses per split."""
IMAGE_SIZE = 32
input_shape = (3, IMAGE_SIZE, IMAGE_SIZE)
"""One image, channels first, as the store and the episodes hold it."""
IMAGES_PER_CLASS = 600
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
PICKLES = ("train", "test", "meta")
"""The pickles of the archive; ``train`` and ``test`` are pooled, in that order."""
SUBFOLDER = "cifar100"
DOWNLOAD = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
"""The official archive's md5 (as the CIFAR page and torchvision list it): for users checking a download."""
LAYOUT_HELP = (
    f"CIFAR-FS and FC100 read the official CIFAR-100 python archive from DIR or DIR/{SUBFOLDER}: either "
    f"{ARCHIVE} as downloaded from {DOWNLOAD} (md5 {ARCHIVE_MD5}), or its extracted folder {FOLDER}/ holding "
    f"the pickles {', '.join(PICKLES)}. Pass DIR as the override task.data_root=DIR or set FASTMAML_DATA=DIR"
)
_CACHE_VERSION = b"fastmaml-cifar100-store-v1"

FINE_LABELS = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
"""CIFAR-100's fine label names in label order (the archive's ``meta`` file; checked when decoding)."""
COARSE_LABELS = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)
"""CIFAR-100's superclass (coarse label) names in label order."""


class CifarDataError(ValueError):
    """The CIFAR-100 files (or a split file) are unusable: corrupt, wrong layout, wrong shapes."""


class CifarNotFoundError(CifarDataError, FileNotFoundError):
    """The CIFAR-100 archive is not where the user pointed."""


@dataclass(frozen=True)
class Splits:
    """A benchmark's class split: fine class names per split and, for FC100, superclass -> fine names."""

    benchmark: str
    classes: dict[str, tuple[str, ...]]
    superclasses: dict[str, dict[str, tuple[str, ...]]]
    """Empty for CIFAR-FS, whose split ignores superclasses."""


@dataclass(frozen=True)
class CifarSource:
    """Where the data is: ``kind`` "folder" (``path`` the folder of the three pickles) or "archive" (the tar.gz)."""

    kind: str
    path: Path


# --- splits -----------------------------------------------------------------------------------


def read_splits(benchmark: str) -> Splits:
    """The class split shipped for ``benchmark`` (cifar_fs | fc100), checked: counts, disjoint, real names."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {', '.join(BENCHMARKS)}; got {benchmark!r}")
    source = f"fastmaml/splits/{benchmark}.yaml"
    try:
        text = resources.files("fastmaml").joinpath("splits", f"{benchmark}.yaml").read_text()
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise CifarDataError(f"{source} is missing or unreadable ({exc}); reinstall fastmaml") from exc
    return _parse_splits(benchmark, data, source)


def class_ids(names: Sequence[str]) -> Tensor:
    """Store rows (fine label ids) of the fine classes ``names``, ascending."""
    unknown = [name for name in names if name not in FINE_LABELS]
    if unknown:
        raise ValueError(f"not CIFAR-100 fine labels: {', '.join(unknown)}")
    return torch.tensor(sorted(FINE_LABELS.index(name) for name in names), dtype=torch.long)


def _parse_splits(benchmark: str, data: Any, source: str) -> Splits:
    if not isinstance(data, dict) or sorted(data) != sorted(SPLITS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CifarDataError(f"{source} must map exactly {', '.join(SPLITS)} to classes, found {found}")
    classes: dict[str, tuple[str, ...]] = {}
    superclasses: dict[str, dict[str, tuple[str, ...]]] = {}
    for split in SPLITS:
        entry = data[split]
        if benchmark == "fc100":
            if not isinstance(entry, dict) or len(entry) != SPLIT_SUPERCLASSES[split]:
                raise CifarDataError(
                    f"{source}: {split} must map {SPLIT_SUPERCLASSES[split]} superclasses to their fine classes"
                )
            bad = [name for name in entry if name not in COARSE_LABELS]
            if bad:
                raise CifarDataError(
                    f"{source}: {split} names unknown CIFAR-100 superclasses {', '.join(map(str, bad))}"
                )
            superclasses[split] = {str(name): _names(fine, f"{source}: {split}.{name}") for name, fine in entry.items()}
            classes[split] = tuple(name for fine in superclasses[split].values() for name in fine)
        else:
            classes[split] = _names(entry, f"{source}: {split}")
        if len(classes[split]) != SPLIT_CLASSES[benchmark][split]:
            raise CifarDataError(
                f"{source}: {split} lists {len(classes[split])} classes, the published split has "
                f"{SPLIT_CLASSES[benchmark][split]}"
            )
    every = [name for split in SPLITS for name in classes[split]]
    repeated = sorted({name for name in every if every.count(name) > 1})
    if repeated:
        raise CifarDataError(f"{source}: classes listed twice (splits must be disjoint): {', '.join(repeated)}")
    return Splits(benchmark, classes, superclasses)


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise CifarDataError(f"{where} must be a list of CIFAR-100 fine label names")
    unknown = [name for name in value if name not in FINE_LABELS]
    if unknown:
        raise CifarDataError(f"{where} lists names that are not CIFAR-100 fine labels: {', '.join(unknown)}")
    return tuple(value)


def _superclass_of() -> dict[str, str]:
    """Fine class -> superclass, from fc100.yaml (which covers all 20 superclasses)."""
    splits = read_splits("fc100")
    return {fine: coarse for groups in splits.superclasses.values() for coarse, names in groups.items()
            for fine in names}


# --- finding and reading the files ------------------------------------------------------------


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, or else the ``FASTMAML_DATA`` environment variable."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("FASTMAML_DATA", "")
    if not env:
        raise CifarNotFoundError(f"no data folder given. {LAYOUT_HELP}")
    return Path(env).expanduser()


def find_cifar100(root: str | os.PathLike[str]) -> CifarSource:
    """The CIFAR-100 files in ``root``, else ``root/cifar100``: the extracted folder before the archive."""
    root = Path(root).expanduser()
    problems = []
    for base in (root, root / SUBFOLDER):
        folder = base / FOLDER
        if folder.is_dir():
            missing = [name for name in PICKLES if not (folder / name).is_file()]
            if not missing:
                return CifarSource("folder", folder)
            problems.append(f"{folder} lacks {', '.join(missing)}")
        if (base / ARCHIVE).is_file():
            return CifarSource("archive", base / ARCHIVE)
    found = f" ({'; '.join(problems)})" if problems else ""
    raise CifarNotFoundError(
        f"CIFAR-100 not found: no {ARCHIVE} and no {FOLDER}/ in {root} or {root / SUBFOLDER}{found}. {LAYOUT_HELP}"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other global, so no code can run."""

    # numpy's own rebuild functions, taken from its reducers so the deprecated numpy.core is never imported
    _reconstruct = np.zeros(1).__reduce__()[0]
    _frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1's name, in the official files
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2's name
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # pickle protocol 5, numpy 1 and 2
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays may appear in a CIFAR-100 pickle"
            ) from None


def read_pickle(data: bytes, where: str) -> dict[bytes, Any]:
    """One CIFAR-100 pickle as a dict with bytes keys, through the restricted unpickler."""
    try:
        value = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError) as exc:
        raise CifarDataError(
            f"{where} is not a readable CIFAR-100 pickle ({exc}); it is truncated, corrupt or not the official "
            f"file: download {DOWNLOAD} again"
        ) from exc
    if not isinstance(value, dict) or not all(isinstance(key, bytes) for key in value):
        raise CifarDataError(f"{where} holds a {type(value).__name__}, expected a dict with bytes keys. {LAYOUT_HELP}")
    return value


def _read_files(source: CifarSource) -> dict[str, bytes]:
    """The bytes of the three pickles (from the folder, or from the archive without extracting it)."""
    if source.kind == "folder":
        return {name: (source.path / name).read_bytes() for name in PICKLES}
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(source.path, "r:gz") as archive:
            for member in archive:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 2 and parts[0] == FOLDER and parts[1] in PICKLES:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    files[parts[1]] = handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CifarDataError(
            f"{source.path} is not a readable tar.gz archive ({exc}); it is truncated or corrupt: download "
            f"{DOWNLOAD} again (md5 {ARCHIVE_MD5})"
        ) from exc
    missing = [f"{FOLDER}/{name}" for name in PICKLES if name not in files]
    if missing:
        raise CifarDataError(f"{source.path} holds no {', '.join(missing)}; it is not the CIFAR-100 python archive. "
                             f"{LAYOUT_HELP}")
    return files


def _source_key(source: CifarSource) -> str:
    """SHA-256 of the archive, or of the three pickles' names and bytes."""
    key = hashlib.sha256(_CACHE_VERSION)
    paths = [source.path] if source.kind == "archive" else [source.path / name for name in PICKLES]
    for path in paths:
        key.update(f"{source.kind}:{path.name}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                key.update(chunk)
    return key.hexdigest()[:20]


# --- decoding ---------------------------------------------------------------------------------


def decode_cifar100(source: CifarSource) -> np.ndarray:
    """The store ``uint8 [100, images per class, 3, 32, 32]`` (no cache), contents checked."""
    files = _read_files(source)
    where = {name: f"{source.path}:{name}" if source.kind == "archive" else str(source.path / name) for name in PICKLES}
    _check_meta(read_pickle(files["meta"], where["meta"]), where["meta"])
    images, fine, coarse = [], [], []
    for name in ("train", "test"):
        x, y_fine, y_coarse = _check_batch(read_pickle(files.pop(name), where[name]), where[name])
        images.append(x)
        fine.append(y_fine)
        coarse.append(y_coarse)
    return _group(np.concatenate(images), np.concatenate(fine), np.concatenate(coarse), str(source.path))


def _check_meta(meta: Mapping[bytes, Any], where: str) -> None:
    for key, expected in ((b"fine_label_names", FINE_LABELS), (b"coarse_label_names", COARSE_LABELS)):
        names = meta.get(key)
        if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names):
            raise CifarDataError(f"{where}: no {key.decode()} list; this is not the CIFAR-100 meta file. {LAYOUT_HELP}")
        decoded = tuple(n.decode("utf-8", "replace") for n in names)
        if decoded != expected:
            raise CifarDataError(
                f"{where}: {key.decode()} is not CIFAR-100's ({len(decoded)} names, first {', '.join(decoded[:3])}); "
                f"the split files name CIFAR-100's classes, so use the official archive {DOWNLOAD}"
            )


def _check_batch(batch: Mapping[bytes, Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``data`` as ``uint8 [n, 3, 32, 32]`` (the rows are R, G, B planes) and the fine and coarse labels."""
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3 * IMAGE_SIZE**2,):
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarDataError(
            f"{where}: 'data' must be a uint8 array [n, 3072] (32x32 RGB images, one per row), got {described}. "
            f"{LAYOUT_HELP}"
        )
    labels = []
    for key, count in ((b"fine_labels", len(FINE_LABELS)), (b"coarse_labels", len(COARSE_LABELS))):
        value = batch.get(key)
        try:
            array = np.asarray(value, dtype=np.int64) if isinstance(value, list | np.ndarray) else None
        except (ValueError, TypeError, OverflowError):
            array = None
        if array is None or array.shape != (data.shape[0],):
            raise CifarDataError(
                f"{where}: '{key.decode()}' must list one label per image ({data.shape[0]}); this is not a "
                f"CIFAR-100 file. {LAYOUT_HELP}"
            )
        if array.size and (array.min() < 0 or array.max() >= count):
            raise CifarDataError(f"{where}: '{key.decode()}' holds labels outside 0..{count - 1}; the file is corrupt")
        labels.append(array)
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), labels[0], labels[1]


def _group(images: np.ndarray, fine: np.ndarray, coarse: np.ndarray, where: str) -> np.ndarray:
    """Images grouped by fine label (stable: file order within a class), superclasses checked."""
    counts = np.bincount(fine, minlength=len(FINE_LABELS))
    if counts.min() != counts.max() or counts.min() == 0:
        odd = [f"{FINE_LABELS[c]} has {counts[c]}" for c in np.flatnonzero(counts != np.bincount(counts).argmax())]
        raise CifarDataError(
            f"{where}: class {', '.join(odd[:5])} images, but every class needs the same number (the real archive "
            f"has {IMAGES_PER_CLASS} per class, train and test together): download {DOWNLOAD} again"
        )
    superclass = _superclass_of()
    expected = np.array([COARSE_LABELS.index(superclass[name]) for name in FINE_LABELS])
    wrong = np.flatnonzero(coarse != expected[fine])
    if wrong.size:
        i = int(wrong[0])
        raise CifarDataError(
            f"{where}: image {i} of class {FINE_LABELS[fine[i]]} has superclass {COARSE_LABELS[coarse[i]]}, but "
            f"CIFAR-100 (and fastmaml/splits/fc100.yaml) puts it in {superclass[FINE_LABELS[fine[i]]]}; the file is "
            f"not the official one: download {DOWNLOAD} again"
        )
    order = np.argsort(fine, kind="stable")
    return np.ascontiguousarray(images[order].reshape(len(FINE_LABELS), int(counts[0]), *input_shape))


# --- loading ----------------------------------------------------------------------------------


def load_cifar100(
    root: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Tensor:
    """The uint8 store ``[100, 600, 3, 32, 32]`` of all CIFAR-100 images, decoded once then cached."""
    source = find_cifar100(resolve_data_root(root))
    cache = resolve_cache_dir(cache_dir) / f"cifar100-{source.kind}-{_source_key(source)}.npy"

    def build() -> np.ndarray:
        print(f"fastmaml: decoding CIFAR-100 from {source.path} once; cached at {cache}", file=sys.stderr)
        return decode_cifar100(source)

    return torch.from_numpy(cached_array(cache, _valid_store, build, "CIFAR-100"))


def build_cifar_tasks(
    task: TaskConfig, split: str, *, shots: int, queries: int, device: torch.device | str
) -> EpisodeSampler:
    """The task source a run config asks for: ``task.name`` (cifar_fs | fc100) over ``split``'s own classes.

    Class ids are fine label ids, ascending. ``task.max_classes`` keeps the first classes of the
    meta-train split only. ``task.rotation`` is ignored: tasks are never rotated. The sampler's
    ``image_shape`` is ``(3, 32, 32)``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if task.name not in BENCHMARKS:
        raise ValueError(f"task.name must be one of {', '.join(BENCHMARKS)} for CIFAR-100 tasks; got {task.name!r}")
    classes = class_ids(read_splits(task.name).classes[split])
    store = load_cifar100(task.data_root or None, cache_dir=task.cache_dir or None)
    if split == "train" and task.max_classes > 0:
        classes = classes[: task.max_classes]
    return EpisodeSampler(store, task.ways, shots, queries, classes=classes, rotation="none", device=device)


def _valid_store(array: np.ndarray) -> bool:
    """Whether a cached array has the store's dtype and layout."""
    return array.dtype == np.uint8 and array.ndim == 5 and array.shape[0] == len(FINE_LABELS) and (
        array.shape[2:] == input_shape)
