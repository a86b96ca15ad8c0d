"""Meta-train / val / test splits by name, shared by every source that splits named units (classes, groups).

Two ways: a seeded split (``sorted(names)`` shuffled by ``random.Random(seed)`` and cut 64/16/20%, the
same on every machine whatever order the data was found in) or the user's own file: YAML or JSON
``{train: [...], val: [...], test: [...]}``. A bare name such as ``cub_closer_look`` is a split file
shipped in ``fastmaml/splits/``.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)
"""Meta-train / val / test shares when no split file is given."""
SHIPPED_SPLITS = ("cub_closer_look", "tieredimagenet")
"""Split files shipped in ``fastmaml/splits``; ``task.split_file`` may name one by its stem."""


def shorten(items: Sequence[str], shown: int = 5) -> str:
    """``a, b, c, ... (N in all)``: the first few names of a long list."""
    items = list(items)
    return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")


def seeded_split(names: Sequence[str], seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                 *, units: str = "classes", error: type[Exception] = ValueError) -> dict[str, list[str]]:
    """Disjoint train/val/test lists of ``names``, cut by ``fractions`` (rounded; val and test get at
    least one each, train the rest); ``units`` names them in messages, raised as ``error``."""
    order = sorted(set(names))
    if len(order) < 3:
        raise error(f"{len(order)} {units} ({shorten(order)}) cannot be split into meta-train, val and test (at "
                    f"least 3 are needed); use data with more {units}, or give task.split_file")
    random.Random(seed).shuffle(order)
    num_val = max(1, round(fractions[1] * len(order)))
    num_test = max(1, round(fractions[2] * len(order)))
    num_train = len(order) - num_val - num_test
    if num_train < 1:
        raise error(f"{len(order)} {units} leave none for meta-training after {num_val} val and {num_test} test "
                    f"{units}; use data with more {units}, or give task.split_file")
    return {"train": order[:num_train], "val": order[num_train:num_train + num_val],
            "test": order[num_train + num_val:]}


def resolve_split_file(split_file: str | os.PathLike[str]) -> Path:
    """``split_file`` as a path; a name that is no file but a shipped ``fastmaml/splits/<name>.yaml`` is that file."""
    path = Path(split_file).expanduser()
    stem = str(split_file).removesuffix(".yaml")
    if not path.exists() and re.fullmatch(r"[A-Za-z0-9_-]+", stem):
        shipped = resources.files("fastmaml").joinpath("splits", f"{stem}.yaml")
        if shipped.is_file():
            return Path(str(shipped))
    return path


def read_split_file(path: str | os.PathLike[str], known: Sequence[str], *, units: str = "classes",
                    error: type[Exception] = ValueError, missing: type[Exception] = FileNotFoundError,
                    fix: str = "") -> dict[str, list[str]]:
    """The train/val/test name lists of a split file, checked against the ``known`` names.

    Names are compared as strings (quote names such as ``007`` in YAML, which would read them as
    numbers). A name the data lacks is an error listing them (``fix`` says what to check); names no
    list mentions are not used; a name in two lists is an error.
    """
    path = resolve_split_file(path)
    if not path.is_file():
        raise missing(f"split file {path} does not exist; set task.split_file to a YAML or JSON file with train, "
                      f"val and test lists of {units} (or a shipped split: {', '.join(SHIPPED_SPLITS)}), or leave "
                      "it empty for a seeded split")
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise error(f"split file {path} is not valid {kind} ({exc}); fix it") from None
    if not isinstance(data, dict) or set(data) != set(SPLITS):
        got = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise error(f"split file {path} must be a mapping with exactly the keys train, val, test (lists of "
                    f"{units}); got {got}")
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        names = data[split] if data[split] is not None else []
        if not isinstance(names, list) or any(isinstance(n, (dict, list)) or n is None for n in names):
            raise error(f"split file {path}: {split} must be a list of {units}, got {names!r}")
        splits[split] = [str(n) for n in names]
        for name in splits[split]:
            if name in owner:
                where = "twice in " + split if owner[name] == split else f"in both {owner[name]} and {split}"
                raise error(f"split file {path}: {name!r} is listed {where}; a name may appear once")
            owner[name] = split
    known_set = set(known)
    unknown = [n for split in SPLITS for n in splits[split] if n not in known_set]
    if unknown:
        raise error(f"split file {path} names {len(unknown)} {units} the data does not have: {shorten(unknown)}; "
                    f"the data's {units} are {shorten(sorted(known))}.{' ' + fix if fix else ''}")
    return splits
