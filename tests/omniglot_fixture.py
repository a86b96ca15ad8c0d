"""Small Omniglot zips in the official layout, with every drawing identifiable after decoding.

Each 105x105 1-bit drawing is a 5x5 grid of 21-pixel cells: the top-left cell is always a stroke
(black), the other three corners never are, and the remaining 21 cells spell a code in binary.
The code is ``class * 20 + drawing`` with classes numbered in the loader's documented order
(background before evaluation, alphabet and character paths sorted), so a test can read back
which drawing and which rotation (the marker moves) any decoded 28x28 image came from.
Entries are written in reverse order so the loader has to sort.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

DRAWINGS = 20
GRID = 5
CELL = 21  # 5 * 21 = 105 pixels
CORNERS = ((0, 0), (0, GRID - 1), (GRID - 1, 0), (GRID - 1, GRID - 1))
CODE_CELLS = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in CORNERS]
LAYOUT: dict[str, dict[str, int]] = {
    "images_background.zip": {"Zeta_script": 2, "Alpha_(Old)": 3, "Mu": 2},
    "images_evaluation.zip": {"Omega": 3, "Beta": 2},
}
"""Characters per alphabet per zip: 7 background + 5 evaluation = 12 classes."""
FIXED_TIME = (2015, 12, 1, 0, 0, 0)


def character_counts(layout: Mapping[str, Mapping[str, int]] = LAYOUT) -> dict[str, int]:
    """Characters per zip, in the form ``load_omniglot(expected_characters=...)`` takes."""
    return {name: sum(alphabets.values()) for name, alphabets in layout.items()}


def class_names(layout: Mapping[str, Mapping[str, int]] = LAYOUT) -> list[str]:
    """``images_background/Alphabet/characterNN`` in the order the store must have."""
    names = []
    for zip_name in ("images_background.zip", "images_evaluation.zip"):
        top = zip_name.removesuffix(".zip")
        alphabets = layout[zip_name]
        names += sorted(f"{top}/{a}/character{i:02d}" for a in alphabets for i in range(1, alphabets[a] + 1))
    return names


def drawing_pixels(code: int) -> np.ndarray:
    """The 105x105 drawing for ``code`` as booleans, True = white paper (as in the official PNGs)."""
    cells = np.ones((GRID, GRID), dtype=bool)
    cells[0, 0] = False
    for bit, (r, c) in enumerate(CODE_CELLS):
        if (code >> bit) & 1:
            cells[r, c] = False
    return np.kron(cells, np.ones((CELL, CELL), dtype=bool))


def png_bytes(code: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(drawing_pixels(code)).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def read_code(image: np.ndarray) -> tuple[int, int]:
    """``(code, quarter_turns)`` of a decoded (strokes bright) square image of any size.

    ``quarter_turns`` is how many ``rot90`` turns were applied to the drawing; -1 codes mean the
    image is not a fixture drawing.
    """
    image = np.asarray(image, dtype=np.float64)
    centres = ((np.arange(GRID) + 0.5) * image.shape[-1] / GRID).astype(int)
    cells = image[np.ix_(centres, centres)] > 127
    for turns in range(4):
        upright = np.rot90(cells, -turns)
        if upright[0, 0] and not any(upright[r, c] for r, c in CORNERS[1:]):
            return sum(int(upright[r, c]) << bit for bit, (r, c) in enumerate(CODE_CELLS)), turns
    return -1, -1


def make_omniglot_zips(
    dest: Path,
    layout: Mapping[str, Mapping[str, int]] = LAYOUT,
    drawings: int = DRAWINGS,
    code_offset: int = 0,
    broken_entry: int | None = None,
) -> dict[str, int]:
    """Write both zips into ``dest``; returns their character counts.

    ``code_offset`` shifts every code (different bytes, same layout); ``broken_entry`` replaces
    that drawing (by position in the zip) with bytes that are not a PNG.
    """
    dest.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(class_names(layout))}
    for zip_name, alphabets in layout.items():
        top = zip_name.removesuffix(".zip")
        entries: list[tuple[str, bytes | None]] = [(f"{top}/", None)]
        for alphabet, count in alphabets.items():
            entries.append((f"{top}/{alphabet}/", None))
            for i in range(1, count + 1):
                character = f"{top}/{alphabet}/character{i:02d}"
                prefix = 101 + index[character]
                entries.append((f"{character}/", None))
                for d in range(drawings):
                    code = index[character] * DRAWINGS + d + code_offset
                    entries.append((f"{character}/{prefix:04d}_{d + 1:02d}.png", png_bytes(code)))
        _write_zip(dest / zip_name, entries[::-1], broken_entry)
    return character_counts(layout)


def _write_zip(path: Path, entries: list[tuple[str, bytes | None]], broken_entry: int | None) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        pngs = 0
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            if data is not None:
                if pngs == broken_entry:
                    data = b"this is not a PNG file"
                pngs += 1
            archive.writestr(info, data or b"", compress_type=zipfile.ZIP_DEFLATED)


def shared_omniglot_dir() -> Path | None:
    """The real zips: ``$FASTMAML_SHARED_DATA/omniglot``, else ``shared/data/omniglot`` beside or in the repo."""
    repo = Path(__file__).resolve().parents[1]
    env = os.environ.get("FASTMAML_SHARED_DATA")
    candidates = [Path(env)] if env else [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for data in candidates:
        folder = data / "omniglot"
        if all((folder / name).is_file() for name in LAYOUT):
            return folder
    return None
