"""Omniglot (Lake et al. 2015) read straight from the official zips, as in the MAML paper's setup.

The two official zips (``images_background.zip``, ``images_evaluation.zip``) are decoded once
into a uint8 store ``[1623, 20, 28, 28]``: each 105x105 1-bit drawing is resized to 28x28 and
inverted so strokes are bright (stroke 255, background 0; the original code feeds ``1 - image``).
Classes are ordered background then evaluation, each by sorted ``alphabet/character`` path. The
store is cached as ``.npy`` keyed by the zips' sha256, so later loads skip decoding.

Three class splits (``task.split``, :data:`SPLIT_SCHEMES`):

- ``paper`` (default) follows the original MAML code (``data_generator.py``): the 1,623
  characters shuffled with Python's ``random.seed(1); random.shuffle(...)``, then the first 1,100
  are meta-train, the next 100 meta-val and the last 423 meta-test. The original shuffled folders
  in ``os.listdir`` order, which depends on the file system, so its exact membership cannot be
  reproduced; here the shuffled list is the deterministic store order, making the split identical
  on every machine.
- ``background`` is Lake et al.'s: meta-test is the 20 evaluation alphabets (659 characters),
  never seen in training; meta-train is the 30 background alphabets less the last 5 in sorted
  order (Ojibwe, Sanskrit, Syriac (Estrangelo), Tagalog, Tifinagh: 151 characters), which are
  meta-val. Whole alphabets are held out so that validation measures what the test measures,
  generalisation to new alphabets; sorted order makes the choice independent of the file system.
  813 / 151 / 659 characters.
- ``vinyals`` is Vinyals et al.'s (2016) split used by most few-shot papers: each (character,
  rotation) pair listed in the split files is a class, 4,112 / 688 / 1,692. The files ship in
  ``fastmaml/tasks/omniglot_vinyals/`` (from jakesnell/prototypical-networks, MIT). Its meta-train
  holds characters of evaluation alphabets, so score Lake et al.'s one-shot runs
  (:func:`fastmaml.fixed_episodes.load_lake_runs`, all from evaluation alphabets) after
  ``background`` training only.

Example (needs the zips; ``root`` may hold them directly or in an ``omniglot/`` subfolder):

>>> store = load_omniglot("data")  # doctest: +SKIP
>>> tasks = omniglot_tasks(store, "train", ways=5, shots=1, queries=15, rotation="per_task")  # doctest: +SKIP
>>> episode = tasks.sample(32, torch.Generator().manual_seed(0))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import os
import random
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastmaml.storage import cached_array, resolve_cache_dir, write_atomic
from fastmaml.tasks.episodes import EpisodeSampler

if TYPE_CHECKING:
    from fastmaml.config import TaskConfig

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
"""Where the official zips live (brendenlake/omniglot)."""
OMNIGLOT_ZIPS = ("images_background.zip", "images_evaluation.zip")
"""The official zips, in store order."""
OMNIGLOT_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
"""md5 of the official zips, as recorded by torchvision's ``Omniglot`` dataset."""
OMNIGLOT_CHARACTERS = {"images_background.zip": 964, "images_evaluation.zip": 659}
"""Characters (classes) per official zip: 30 + 20 alphabets, 1,623 characters in all."""
DRAWINGS = 20
"""Drawings per character (20 people drew each one)."""
SOURCE_SIZE = 105
SPLIT_SEED = 1
NUM_TRAIN = 1100
NUM_VAL = 100
SPLITS = ("train", "val", "test")
SPLIT_SCHEMES = ("paper", "background", "vinyals")
"""``task.split`` choices; see the module docstring."""
BACKGROUND_VAL_ALPHABETS = 5
"""``background`` split: the last this many background alphabets (sorted) are meta-val."""
VINYALS_SPLIT_DIR = importlib.resources.files("fastmaml.tasks") / "omniglot_vinyals"
"""The shipped Vinyals split files ``train.txt``, ``val.txt``, ``test.txt``."""
VINYALS_TURNS = {"rot000": 0, "rot090": 1, "rot180": 2, "rot270": 3}
"""Vinyals rotation suffix -> counter-clockwise quarter turns (``PIL.Image.rotate(deg)`` = ``torch.rot90``)."""
DOWNLOAD_HINT = "fastmaml data omniglot --download DIR"
_CACHE_VERSION = b"fastmaml-omniglot-store-v1"


class OmniglotDataError(ValueError):
    """The Omniglot files are unusable (corrupt, truncated, wrong layout, failed download)."""


class OmniglotNotFoundError(OmniglotDataError, FileNotFoundError):
    """The Omniglot zips are not where the user pointed."""


def resolve_data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """``root``, or else the ``FASTMAML_DATA`` environment variable."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get("FASTMAML_DATA", "")
    if not env:
        raise OmniglotNotFoundError(
            "no Omniglot data folder given: add the override task.data_root=DIR (fastmaml train / eval) or set "
            f"FASTMAML_DATA=DIR, where DIR holds {' and '.join(OMNIGLOT_ZIPS)} (`fastmaml demo` takes "
            f"--data-root DIR); get them with `{DOWNLOAD_HINT}`"
        )
    return Path(env).expanduser()


def find_omniglot_zips(root: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The official zips in ``root`` or ``root/omniglot``, in store order."""
    root = Path(root).expanduser()
    for folder in (root, root / "omniglot"):
        paths = tuple(folder / name for name in OMNIGLOT_ZIPS)
        if all(p.is_file() for p in paths):
            return paths
    missing = [str(root / n) for n in OMNIGLOT_ZIPS if not (root / n).is_file()]
    raise OmniglotNotFoundError(
        f"Omniglot zips not found: {', '.join(missing)} (also looked in {root / 'omniglot'}). "
        f"Download them with `{DOWNLOAD_HINT}` (or from {OMNIGLOT_URL}) and point task.data_root=DIR (or "
        f"FASTMAML_DATA=DIR) at that folder"
    )


def omniglot_characters(
    root: str | os.PathLike[str], expected_characters: Mapping[str, int] | None = OMNIGLOT_CHARACTERS
) -> list[str]:
    """Class names in store order (``images_background/Alphabet/character01``), checking the layout.

    Reads only the zips' directories, so it is a cheap integrity check of the counts.
    """
    names = []
    for path in find_omniglot_zips(root):
        with _open_zip(path) as archive:
            names.extend(_character_drawings(path, archive, expected_characters))
    return names


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int = 28,
    antialias: bool = True,
    expected_characters: Mapping[str, int] | None = OMNIGLOT_CHARACTERS,
) -> Tensor:
    """The uint8 store ``[classes, 20, image_size, image_size]``, decoded once then cached.

    ``antialias=True`` resizes the grey image with Lanczos. ``antialias=False`` reproduces what
    the original resize script actually produced: Pillow ignores the LANCZOS filter on 1-bit
    images and uses nearest neighbour, so its 28x28 images were binary. ``expected_characters``
    (characters per zip) guards against a truncated download; ``None`` skips that check.
    """
    zips = find_omniglot_zips(resolve_data_root(root))
    cache = resolve_cache_dir(cache_dir) / _cache_name(zips, image_size, antialias)

    def decode() -> np.ndarray:
        print(f"decoding the Omniglot zips in {zips[0].parent} once (~10 s), cached at {cache}", file=sys.stderr,
              flush=True)
        return decode_omniglot(zips, image_size, antialias, expected_characters)

    store = cached_array(cache, _valid_store, decode, "Omniglot")
    _check_total(zips, store.shape[0], expected_characters)
    return torch.from_numpy(store)


def decode_omniglot(
    zips: tuple[Path, ...],
    image_size: int = 28,
    antialias: bool = True,
    expected_characters: Mapping[str, int] | None = OMNIGLOT_CHARACTERS,
) -> np.ndarray:
    """Decode every drawing of ``zips`` into ``uint8 [classes, 20, size, size]``, strokes bright.

    The layout and counts are checked before any image is decoded, so a bad zip fails at once.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    blocks = []
    for path in zips:
        with _open_zip(path) as archive:
            drawings = _character_drawings(path, archive, expected_characters)
            block = np.empty((len(drawings), DRAWINGS, image_size, image_size), dtype=np.uint8)
            for c, entries in enumerate(drawings.values()):
                for d, entry in enumerate(entries):
                    block[c, d] = _decode_png(path, archive, entry, image_size, antialias)
        blocks.append(block)
    return np.concatenate(blocks)


def omniglot_splits(
    num_classes: int = sum(OMNIGLOT_CHARACTERS.values()),
    num_train: int = NUM_TRAIN,
    num_val: int = NUM_VAL,
    seed: int = SPLIT_SEED,
) -> dict[str, Tensor]:
    """Disjoint class ids per split: ``random.Random(seed).shuffle(range(num_classes))`` cut into
    the first ``num_train`` (train), the next ``num_val`` (val) and the rest (test).

    This is the original code's ``random.seed(1); random.shuffle(folders)`` with 1,100/100/423;
    the counts are arguments so small test stores can be split the same way.
    """
    if num_train < 1 or num_val < 0 or num_train + num_val >= num_classes:
        raise ValueError(
            f"cannot split {num_classes} classes into train={num_train}, val={num_val} and a non-empty test split"
        )
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val), "test": (num_train + num_val, None)}
    return {name: torch.tensor(order[start:stop], dtype=torch.long) for name, (start, stop) in bounds.items()}


def background_splits(names: Sequence[str], val_alphabets: int = BACKGROUND_VAL_ALPHABETS) -> dict[str, Tensor]:
    """Lake et al.'s split of store classes ``names`` (:func:`omniglot_characters`): class ids per split.

    test = every ``images_evaluation`` character; val = the characters of the last ``val_alphabets``
    background alphabets in sorted order; train = the other background characters.
    """
    background, evaluation = (name.removesuffix(".zip") for name in OMNIGLOT_ZIPS)
    alphabets = sorted({_parts(name)[1] for name in names if _parts(name)[0] == background})
    if not 0 <= val_alphabets < len(alphabets):
        raise ValueError(
            f"val_alphabets={val_alphabets} but the store has {len(alphabets)} background alphabets; hold out "
            f"between 0 and {len(alphabets) - 1} so meta-train keeps at least one"
        )
    held_out = set(alphabets[len(alphabets) - val_alphabets :])
    ids: dict[str, list[int]] = {split: [] for split in SPLITS}
    for i, name in enumerate(names):
        top, alphabet, _ = _parts(name)
        if top == evaluation:
            ids["test"].append(i)
        elif top == background:
            ids["val" if alphabet in held_out else "train"].append(i)
        else:
            raise ValueError(f"class {name!r} is neither in {background} nor in {evaluation}")
    if not ids["test"]:
        raise OmniglotDataError(f"the store has no {evaluation} characters, so the background split has no test set")
    return {split: torch.tensor(members, dtype=torch.long) for split, members in ids.items()}


def vinyals_splits(names: Sequence[str], split_dir: str | os.PathLike[str] | None = None) -> dict[str, Tensor]:
    """Vinyals et al.'s split: ``[classes, 2]`` rows of (store class id, quarter turns) per split, in file order.

    Each line of ``split_dir/{train,val,test}.txt`` (default: the shipped copy) is
    ``Alphabet/characterNN/rotDDD``; the alphabet and character are looked up among ``names``
    (:func:`omniglot_characters`, the zip's top folder dropped) and ``rotDDD`` is DDD degrees
    counter-clockwise. The splits are checked to be disjoint.
    """
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        key = "/".join(_parts(name)[1:])
        if key in index:
            raise OmniglotDataError(
                f"alphabet/character {key!r} is in both zips, so the Vinyals split cannot tell them apart"
            )
        index[key] = i
    folder = VINYALS_SPLIT_DIR if split_dir is None else Path(split_dir)
    splits, owner = {}, {}
    for split in SPLITS:
        file = folder / f"{split}.txt"
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as exc:
            raise OmniglotNotFoundError(
                f"Vinyals split file {file} is missing; reinstall fastmaml (it ships the split files)"
            ) from exc
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            character, _, rotation = line.strip().rpartition("/")
            problem = ""
            if rotation not in VINYALS_TURNS:
                problem = f"rotation {rotation!r} is not one of {', '.join(VINYALS_TURNS)}"
            elif character not in index:
                problem = f"{character!r} is not a character of the Omniglot zips"
            if problem:
                raise OmniglotDataError(
                    f"{file}:{number}: {line!r} is not Alphabet/characterNN/rotDDD of this data set ({problem}); "
                    f"use the official zips and the split files as shipped"
                )
            pair = (index[character], VINYALS_TURNS[rotation])
            if pair in owner:
                raise OmniglotDataError(f"{file}:{number}: {line!r} is already listed in {owner[pair]}.txt")
            owner[pair] = split
            rows.append(pair)
        splits[split] = torch.tensor(rows, dtype=torch.long).reshape(-1, 2)
    return splits


def rotated_classes(store: Tensor, pairs: Tensor) -> Tensor:
    """A store whose class ``i`` is store class ``pairs[i, 0]`` turned ``pairs[i, 1]`` quarter turns.

    Lets an :class:`EpisodeSampler` with ``rotation="none"`` draw exactly the listed (class,
    rotation) pairs, as the Vinyals split needs; rotating uint8 images is a cheap copy.
    """
    view = store.new_empty((len(pairs), *store.shape[1:]))
    for turns in range(4):
        rows = (pairs[:, 1] == turns).nonzero().squeeze(1)
        if rows.numel():
            view[rows] = torch.rot90(store[pairs[rows, 0]], turns, dims=(-2, -1))
    return view


def omniglot_tasks(
    store: Tensor,
    split: str,
    ways: int,
    shots: int,
    queries: int,
    rotation: str = "none",
    device: torch.device | str = "cpu",
    *,
    scheme: str = "paper",
    names: Sequence[str] | None = None,
    num_train: int = NUM_TRAIN,
    num_val: int = NUM_VAL,
    seed: int = SPLIT_SEED,
    val_alphabets: int = BACKGROUND_VAL_ALPHABETS,
    split_dir: str | os.PathLike[str] | None = None,
    max_classes: int = 0,
) -> EpisodeSampler:
    """An N-way K-shot task source over one split of ``store``, its images copied to ``device``.

    ``scheme`` is one of :data:`SPLIT_SCHEMES`; ``background`` and ``vinyals`` need the class
    ``names`` (:func:`omniglot_characters`). ``vinyals`` classes are (character, rotation) pairs,
    so it takes ``rotation="classes"`` only. ``max_classes > 0`` keeps only the first that many
    classes of the split (quick runs).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if scheme == "paper":
        classes = omniglot_splits(store.shape[0], num_train=num_train, num_val=num_val, seed=seed)[split]
    elif scheme == "background":
        classes = background_splits(_check_names(names, store, scheme), val_alphabets)[split]
    elif scheme == "vinyals":
        if rotation != "classes":
            raise ValueError(
                f"task.split=vinyals makes each (character, rotation) listed in its files a class, so it needs "
                f"task.rotation=classes; got {rotation!r}"
            )
        pairs = vinyals_splits(_check_names(names, store, scheme), split_dir)[split]
        pairs = pairs[:max_classes] if max_classes > 0 else pairs
        return EpisodeSampler(rotated_classes(store, pairs), ways, shots, queries, rotation="none", device=device)
    else:
        raise ValueError(f"task.split must be one of {', '.join(SPLIT_SCHEMES)}; got {scheme!r}")
    if max_classes > 0:
        classes = classes[:max_classes]
    return EpisodeSampler(store, ways, shots, queries, classes=classes, rotation=rotation, device=device)


def build_omniglot_tasks(
    task: TaskConfig, split: str, *, shots: int, queries: int, device: torch.device | str
) -> EpisodeSampler:
    """The task source a run config asks for; ``task.max_classes`` limits the meta-train split only.

    ``task.split`` picks the class split (empty means ``paper``). The configured rotation applies
    to every split (the original code rotated test tasks too).
    """
    scheme = getattr(task, "split", "") or "paper"
    if scheme not in SPLIT_SCHEMES:
        raise ValueError(f"task.split must be one of {', '.join(SPLIT_SCHEMES)}; got {scheme!r}")
    store = load_omniglot(task.data_root or None, cache_dir=task.cache_dir or None)
    names = None if scheme == "paper" else omniglot_characters(resolve_data_root(task.data_root or None))
    max_classes = task.max_classes if split == "train" else 0
    return omniglot_tasks(
        store, split, task.ways, shots, queries, rotation=task.rotation, device=device, scheme=scheme, names=names,
        max_classes=max_classes,
    )


def _parts(name: str) -> tuple[str, str, str]:
    """``images_background/Alphabet/character01`` -> its three parts."""
    parts = name.split("/")
    if len(parts) != 3:
        raise ValueError(
            f"class name {name!r} is not <set>/<Alphabet>/<character>; take the names from omniglot_characters"
        )
    return parts[0], parts[1], parts[2]


def _check_names(names: Sequence[str] | None, store: Tensor, scheme: str) -> Sequence[str]:
    if names is None or len(names) != store.shape[0]:
        got = "none" if names is None else str(len(names))
        raise ValueError(
            f"split scheme {scheme!r} needs one class name per store class ({store.shape[0]}), got {got}; pass "
            f"names=omniglot_characters(root)"
        )
    return names


def download_omniglot(
    dest_dir: str | os.PathLike[str],
    base_url: str = OMNIGLOT_URL,
    checksums: Mapping[str, str] = OMNIGLOT_MD5,
    timeout: float = 60.0,
) -> list[Path]:
    """Fetch the official zips into ``dest_dir``, verifying each md5; files already verified are kept."""
    missing = [name for name in OMNIGLOT_ZIPS if name not in checksums]
    if missing:
        raise ValueError(
            f"checksums has no md5 for {', '.join(missing)}; give one for each of {', '.join(OMNIGLOT_ZIPS)}"
        )
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in OMNIGLOT_ZIPS:
        target = dest / name
        if not (target.is_file() and _md5_file(target) == checksums[name].lower()):
            _download(f"{base_url.rstrip('/')}/{name}", target, checksums[name].lower(), timeout)
        paths.append(target)
    return paths


# --- zips -------------------------------------------------------------------------------------


def _redownload(path: Path) -> str:
    return f"re-download it with `{DOWNLOAD_HINT.replace('DIR', str(path.parent))}`"


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError as exc:
        raise OmniglotNotFoundError(f"{path} does not exist; {_redownload(path)}") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise OmniglotDataError(
            f"{path} is not a readable zip ({exc}); it is truncated or corrupt: {_redownload(path)}"
        ) from exc


def _drawings_by_character(path: Path, archive: zipfile.ZipFile) -> dict[str, list[str]]:
    """``top/alphabet/character`` -> its PNG entries, sorted; the official layout is enforced."""
    groups: dict[str, list[str]] = {}
    for entry in archive.namelist():
        if entry.endswith("/") or entry.startswith("__MACOSX/") or not entry.lower().endswith(".png"):
            continue
        parts = entry.split("/")
        if len(parts) != 4:
            raise OmniglotDataError(
                f"{path}: entry {entry!r} is not at <set>/<Alphabet>/<character>/<drawing>.png as in the official "
                f"zip; {_redownload(path)}"
            )
        groups.setdefault("/".join(parts[:3]), []).append(entry)
    return {character: sorted(entries) for character, entries in sorted(groups.items())}


def _character_drawings(
    path: Path, archive: zipfile.ZipFile, expected: Mapping[str, int] | None
) -> dict[str, list[str]]:
    """:func:`_drawings_by_character`, after checking the counts of characters and drawings."""
    groups = _drawings_by_character(path, archive)
    want = None if expected is None else expected.get(path.name)
    if want is not None and len(groups) != want:
        raise OmniglotDataError(
            f"{path} holds {len(groups)} characters, expected {want}; it is incomplete or not the official "
            f"file: {_redownload(path)}"
        )
    if not groups:
        raise OmniglotDataError(f"{path} holds no PNG drawings; {_redownload(path)}")
    for character, entries in groups.items():
        if len(entries) != DRAWINGS:
            raise OmniglotDataError(
                f"{path}: {character} has {len(entries)} drawings, expected {DRAWINGS}; {_redownload(path)}"
            )
    return groups


def _decode_png(path: Path, archive: zipfile.ZipFile, entry: str, size: int, antialias: bool) -> np.ndarray:
    """One drawing as ``uint8 [size, size]``, strokes 255 on a 0 background."""
    try:
        data = archive.read(entry)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise OmniglotDataError(f"{path}: {entry} is not a decodable PNG ({exc}); {_redownload(path)}") from exc
    return decode_drawing(data, f"{path}: {entry}", size, antialias, fix=_redownload(path))


def decode_drawing(data: bytes, where: str, size: int = 28, antialias: bool = True, fix: str = "") -> np.ndarray:
    """One 105x105 Omniglot PNG as ``uint8 [size, size]``, strokes 255 on a 0 background.

    The store's preprocessing (see :func:`load_omniglot` for ``antialias``), public so that other
    files of the same drawings (Lake et al.'s one-shot runs) are treated exactly alike. Errors
    name ``where`` and end with ``fix``.
    """
    fix = f"; {fix}" if fix else ""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.size != (SOURCE_SIZE, SOURCE_SIZE):
                raise OmniglotDataError(
                    f"{where} is {image.size[0]}x{image.size[1]}, expected {SOURCE_SIZE}x{SOURCE_SIZE}{fix}"
                )
            if antialias:
                small = image.convert("L").resize((size, size), Image.Resampling.LANCZOS)
            else:
                small = image.convert("1").resize((size, size), Image.Resampling.NEAREST).convert("L")
            pixels = np.asarray(small, dtype=np.uint8)
    except OmniglotDataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise OmniglotDataError(f"{where} is not a decodable PNG ({exc}){fix}") from exc
    return 255 - pixels


def _check_total(zips: tuple[Path, ...], total: int, expected: Mapping[str, int] | None) -> None:
    if expected is None or any(p.name not in expected for p in zips):
        return
    want = sum(expected[p.name] for p in zips)
    if total != want:
        raise OmniglotDataError(
            f"the Omniglot store holds {total} characters, expected {want}; the zips "
            f"{', '.join(map(str, zips))} are incomplete or not the official files: {_redownload(zips[0])}"
        )


# --- cache ------------------------------------------------------------------------------------


def _cache_name(zips: tuple[Path, ...], image_size: int, antialias: bool) -> str:
    """File name keyed by the zips' contents and the decode settings, so any change misses."""
    key = hashlib.sha256(_CACHE_VERSION)
    key.update(f"size={image_size};antialias={antialias}".encode())
    for path in zips:
        key.update(path.name.encode() + b"=" + _digest_file(path, "sha256").encode())
    resample = "lanczos" if antialias else "nearest"
    return f"omniglot-{image_size}px-{resample}-{key.hexdigest()[:20]}.npy"


# --- download ---------------------------------------------------------------------------------


def _digest_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _md5_file(path: Path) -> str:
    return _digest_file(path, "md5")


def _download(url: str, target: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` into ``target`` atomically; a checksum mismatch leaves nothing behind."""
    digest = hashlib.md5(usedforsecurity=False)

    def write(f: io.BufferedWriter) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as exc:
            raise OmniglotDataError(
                f"could not download {url} ({exc}); check the network, or fetch the file by hand into {target.parent}"
            ) from exc
        if digest.hexdigest() != md5:
            raise OmniglotDataError(
                f"downloaded {url} has md5 {digest.hexdigest()}, expected {md5}; the file was not saved. "
                f"Retry; if the official file has changed, pass the new checksums"
            )

    write_atomic(target, write)


def _valid_store(array: np.ndarray) -> bool:
    """Whether a cached array has the store's dtype and layout."""
    return array.dtype == np.uint8 and array.ndim == 4
