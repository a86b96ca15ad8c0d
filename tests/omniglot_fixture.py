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


DATA_ENV = ("FASTMAML_DATA", "FASTMAML_SHARED_DATA")
"""Where the real data may be: ``FASTMAML_DATA`` as for the product; ``FASTMAML_SHARED_DATA`` is an older alias."""


def shared_omniglot_dir() -> Path | None:
    """The real zips: in ``$FASTMAML_DATA`` or ``$FASTMAML_DATA/omniglot`` (as the loader looks),
    then the same under ``$FASTMAML_SHARED_DATA``, then ``shared/data/omniglot`` beside or in the repo."""
    repo = Path(__file__).resolve().parents[1]
    roots = [Path(os.environ[name]).expanduser() for name in DATA_ENV if os.environ.get(name)]
    roots += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for folder in (f for root in roots for f in (root, root / "omniglot")):
        if all((folder / name).is_file() for name in LAYOUT):
            return folder
    return None


# --- class splits and Lake et al.'s one-shot runs (tests/test_omniglot_splits.py, test_fixed_episodes.py) ---


def split_layout() -> dict[str, dict[str, int]]:
    """7 background alphabets (the ``background`` split holds out the last 5 sorted) and 3 evaluation ones."""
    return {
        "images_background.zip": {"Bb": 2, "Aa": 3, "Gg": 1, "Cc": 2, "Ff": 1, "Dd": 2, "Ee": 1},
        "images_evaluation.zip": {"Yy": 2, "Xx": 1, "Zz": 2},
    }


def write_split_files(dest: Path, lines: Mapping[str, list[str]]) -> Path:
    """``dest/<split>.txt`` per split with one ``Alphabet/characterNN/rotDDD`` line each (Vinyals format)."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        (dest / f"{split}.txt").write_text("".join(f"{row}\n" for row in rows))
    return dest


def lake_code(run: int, class_index: int, test: bool) -> int:
    """The fixture code drawn for class ``class_index`` (0-based) of run ``run`` (1-based); bit 20 marks test items."""
    return run * 64 + class_index + ((1 << 20) if test else 0)


def read_lake_code(image: np.ndarray) -> tuple[int, int, bool]:
    """``(run, class_index, test)`` of a decoded upright Lake fixture image (inverse of :func:`lake_code`)."""
    code, turns = read_code(image)
    assert code >= 0 and turns == 0, "not an upright fixture drawing"
    return (code & ~(1 << 20)) // 64, code % 64, bool(code & (1 << 20))


def make_lake_runs(
    dest: Path, runs: int = 2, ways: int = 20, as_zip: bool = True, seed: int = 0
) -> dict[str, list[int]]:
    """Lake et al.'s one-shot runs in their published layout (``all_runs.zip`` or its folder) at ``dest``.

    ``runNN/training/classKK.png`` draws :func:`lake_code` (run, KK-1); ``runNN/test/itemMM.png``
    draws a random class's test code; ``class_labels.txt`` lists ``runNN/test/itemMM.png
    runNN/training/classKK.png`` in shuffled order. Returns the true 0-based class of each item per run.
    """
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    truth = {}
    for run in range(1, runs + 1):
        name = f"run{run:02d}"
        classes = rng.permutation(ways).tolist()
        truth[name] = classes
        for k in range(ways):
            files[f"{name}/training/class{k + 1:02d}.png"] = png_bytes(lake_code(run, k, test=False))
        lines = []
        for m, k in enumerate(classes):
            files[f"{name}/test/item{m + 1:02d}.png"] = png_bytes(lake_code(run, k, test=True))
            lines.append(f"{name}/test/item{m + 1:02d}.png {name}/training/class{k + 1:02d}.png\n")
        files[f"{name}/class_labels.txt"] = "".join(rng.permutation(lines).tolist()).encode()
    if as_zip:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in sorted(files, reverse=True):
                archive.writestr(zipfile.ZipInfo(name, date_time=FIXED_TIME), files[name])
    else:
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
    return truth


def lake_runs_zip() -> Path | None:
    """Lake's published ``all_runs.zip``: ``$FASTMAML_LAKE_RUNS``, else beside the shared real zips."""
    env = os.environ.get("FASTMAML_LAKE_RUNS")
    if env:
        return Path(env) if Path(env).exists() else None
    folder = shared_omniglot_dir()
    return folder / "all_runs.zip" if folder is not None and (folder / "all_runs.zip").is_file() else None
