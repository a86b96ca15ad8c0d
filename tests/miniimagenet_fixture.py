"""Small MiniImagenet data sets in both real layouts, with every image identifiable after decoding.

File names and class ids come from the real Ravi & Larochelle split files when they are present
(the first classes of each split, the first images of each class), else from made-up ids of the
same form. Each image is a 4x4 grid of cells of any size: in the red channel the top-left cell is
always bright and the other 15 cells spell the image's code in binary; green and blue hold the
class colour plus noise, so classes are easy to tell apart and a short training run learns.
Sizes vary (some 84x84, most not) and a few files are greyscale, CMYK or a PNG named ``.jpg``,
as in ImageNet, so conversion and resizing are exercised. Rows of the csv files and images of
the pickles are written shuffled, so the loader has to sort.
"""

from __future__ import annotations

import csv
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
CLASSES = {"train": 6, "val": 5, "test": 5}
"""Classes per split: enough for 5-way tasks in every split."""
IMAGES = 20
GRID = 4
CODE_CELLS = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) != (0, 0)]
SIZES = ((100, 90), (84, 84), (120, 100), (90, 110), (150, 120))
"""Width x height, cycled over the images."""
LEVELS = (30, 90, 150, 210)
MODES = {(0, 3): "L", (1, 4): "CMYK", (2, 5): "PNG"}
"""(class position, image position) in each split -> how that file is stored (else RGB JPEG)."""


@dataclass(frozen=True)
class FixtureImage:
    split: str
    label: str
    filename: str
    code: int
    colour: tuple[int, int]
    """(green, blue) of the class."""
    size: tuple[int, int]
    mode: str


DATA_ENV = ("FASTMAML_DATA", "FASTMAML_SHARED_DATA")
"""Where the real data may be: ``FASTMAML_DATA`` as for the product; ``FASTMAML_SHARED_DATA`` is an older alias."""


def shared_miniimagenet_splits() -> Path | None:
    """The real split files, where the loader looks for them under ``$FASTMAML_DATA`` (the folder
    or its ``miniimagenet/``, each with the csv files or a ``splits/`` folder of them), then the
    same under ``$FASTMAML_SHARED_DATA``, then ``shared/data`` beside or in the repo."""
    repo = Path(__file__).resolve().parents[1]
    roots = [Path(os.environ[name]).expanduser() for name in DATA_ENV if os.environ.get(name)]
    roots += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for folder in (f for root in roots for data in (root, root / "miniimagenet") for f in (data, data / "splits")):
        if all((folder / f"{split}.csv").is_file() for split in SPLITS):
            return folder
    return None


def split_rows(split: str, classes: int, images: int) -> list[tuple[str, str]]:
    """``(filename, label)`` rows: the first ``classes`` classes and ``images`` images of the real file."""
    real = shared_miniimagenet_splits()
    if real is None:
        offset = 1000 * SPLITS.index(split)
        labels = [f"n{9_000_000 + offset + 37 * c:08d}" for c in range(classes)]
        return [(f"{label}{i * 3 + 1:08d}.jpg", label) for label in labels for i in range(images)]
    rows: dict[str, list[str]] = {}
    with open(real / f"{split}.csv", newline="") as f:
        for name, label in list(csv.reader(f))[1:]:
            if label in rows or len(rows) < classes:
                rows.setdefault(label, []).append(name)
    return [(name, label) for label, names in rows.items() for name in names[:images]]


def manifest(classes: dict[str, int] = CLASSES, images: int = IMAGES) -> dict[str, list[FixtureImage]]:
    """Every fixture image per split, in the store order the loader must produce (labels, then names sorted)."""
    result: dict[str, list[FixtureImage]] = {}
    code, colour = 1, 0
    for split in SPLITS:
        rows = split_rows(split, classes[split], images)
        labels = sorted({label for _, label in rows})
        entries = []
        for c, label in enumerate(labels):
            g, b = LEVELS[colour // len(LEVELS)], LEVELS[colour % len(LEVELS)]
            colour += 1
            for e, name in enumerate(sorted(n for n, lab in rows if lab == label)):
                mode = MODES.get((c, e), "RGB")
                entries.append(FixtureImage(split, label, name, code, (g, b), SIZES[code % len(SIZES)], mode))
                code += 1
        result[split] = entries
    return result


def image_pixels(image: FixtureImage, code: int | None = None) -> np.ndarray:
    """``uint8 [H, W, 3]``: the code grid in red, the class colour plus noise in green and blue."""
    code = image.code if code is None else code
    width, height = image.size
    cells = np.zeros((GRID, GRID), dtype=bool)
    cells[0, 0] = True
    for bit, (r, c) in enumerate(CODE_CELLS):
        cells[r, c] = bool((code >> bit) & 1)
    rows = np.arange(height) * GRID // height
    cols = np.arange(width) * GRID // width
    red = np.where(cells[rows[:, None], cols[None, :]], 255, 0)
    rng = np.random.default_rng(code)
    green = image.colour[0] + rng.normal(0, 12, (height, width))
    blue = image.colour[1] + rng.normal(0, 12, (height, width))
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).round().astype(np.uint8)


def read_code(image: np.ndarray) -> int:
    """The code of a decoded image, ``[3, H, W]`` uint8 or float in [0, 1]; -1 if it is no fixture image."""
    red = np.asarray(image, dtype=np.float64)[0]
    if red.max() <= 1.0:
        red = red * 255
    centres = ((np.arange(GRID) + 0.5) * red.shape[-1] / GRID).astype(int)
    cells = red[np.ix_(centres, centres)] > 127
    if not cells[0, 0]:
        return -1
    return sum(int(cells[r, c]) << bit for bit, (r, c) in enumerate(CODE_CELLS))


def write_image(path: Path, image: FixtureImage, code: int | None = None) -> None:
    pixels = Image.fromarray(image_pixels(image, code))
    if image.mode == "L":
        Image.fromarray(np.asarray(pixels)[..., 0]).save(path, format="JPEG", quality=95)
    elif image.mode == "CMYK":
        pixels.convert("CMYK").save(path, format="JPEG", quality=95)
    elif image.mode == "PNG":
        pixels.save(path, format="PNG")  # ImageNet has a PNG named .JPEG; Pillow reads by content
    else:
        pixels.save(path, format="JPEG", quality=95, subsampling=0)


def make_csv_layout(root: Path, images: dict[str, list[FixtureImage]], in_splits_folder: bool = True) -> Path:
    """``root/images/*.jpg`` and the split files (in ``root/splits`` or ``root``), rows shuffled."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    folder = root / "splits" if in_splits_folder else root
    folder.mkdir(parents=True, exist_ok=True)
    for split, entries in images.items():
        for image in entries:
            write_image(root / "images" / image.filename, image)
        rows = [(image.filename, image.label) for image in entries]
        random.Random(split).shuffle(rows)
        write_split_csv(folder / f"{split}.csv", rows)
    return root


def write_split_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["filename", "label"])
        writer.writerows(rows)


def oracle_image(path: Path) -> np.ndarray:
    """An independent decode of one file: Pillow's RGB conversion, then the original ``proc_images.py`` resize."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((84, 84), resample=Image.Resampling.LANCZOS))


def make_pickle_layout(root: Path, images_dir: Path, images: dict[str, list[FixtureImage]]) -> Path:
    """``root/mini-imagenet-cache-<split>.pkl`` from the same files, decoded by :func:`oracle_image`.

    ``image_data`` is in shuffled order, so only ``class_dict`` says which image is which.
    """
    root.mkdir(parents=True, exist_ok=True)
    for split, entries in images.items():
        order = list(range(len(entries)))
        random.Random(f"pickle-{split}").shuffle(order)  # image_data[i] is entries[order[i]]
        position = {entry: i for i, entry in enumerate(order)}
        data = np.stack([oracle_image(images_dir / entries[i].filename) for i in order])
        labels = sorted({entry.label for entry in entries}, reverse=True)  # dict order must not matter
        class_dict = {
            label: [position[i] for i, entry in enumerate(entries) if entry.label == label] for label in labels
        }
        write_pickle(root / f"mini-imagenet-cache-{split}.pkl", {"image_data": data, "class_dict": class_dict})
    return root


def write_pickle(path: Path, data: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
