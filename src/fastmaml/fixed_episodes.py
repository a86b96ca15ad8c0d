"""Fixed evaluation episodes: the same tasks, saved once, for every method compared.

Sampling test tasks from a seed makes two evaluations agree only while the sampler, the split
and the data stay the same. A saved episodes file removes those conditions: MAML, a baseline,
or the same run a year later are scored on exactly the tensors in the file, and the file's
sha256 (``meta["sha256"]`` after :func:`load_episodes`) names the task set in a results table.

The file is a ``torch.save`` of plain tensors, lists and dicts, so it opens with
``torch.load(weights_only=True)`` and never runs code. Images that are exactly ``k/255`` (every
image task fastmaml samples) are stored as uint8 and restored bit for bit; other tensors are
stored as they are. :func:`load_lake_runs` reads Lake et al.'s twenty 20-way 1-shot runs
(``all_runs.zip`` of brendenlake/omniglot) into the same episodes.

Example:

>>> import tempfile, torch
>>> from fastmaml.tasks.episodes import EpisodeSampler
>>> store = torch.randint(0, 256, (10, 6, 28, 28), dtype=torch.uint8)
>>> episodes = [EpisodeSampler(store, 5, 1, 5).sample(4, torch.Generator().manual_seed(0))]
>>> with tempfile.TemporaryDirectory() as folder:
...     save_episodes(folder + "/test.pt", episodes, {"split": "test"})
...     loaded, meta = load_episodes(folder + "/test.pt")
>>> torch.equal(loaded[0].query_x, episodes[0].query_x), meta["split"]
(True, 'test')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastmaml.episode import Episode
from fastmaml.storage import write_atomic
from fastmaml.tasks.omniglot import OmniglotDataError, OmniglotNotFoundError, decode_drawing

if TYPE_CHECKING:
    from fastmaml.learners import MAML
    from fastmaml.rules import InnerRule

__all__ = [
    "EpisodesFileError",
    "EpisodesNotFoundError",
    "episodes_digest",
    "evaluate_fixed",
    "load_episodes",
    "load_lake_runs",
    "save_episodes",
]

FORMAT = "fastmaml-episodes"
VERSION = 1
FIELDS = tuple(f.name for f in fields(Episode))
LAKE_SOURCE = "all_runs.zip of brendenlake/omniglot (python/one-shot-classification/)"
_LABELS = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<run>run\d+)/class_labels\.txt$")


class EpisodesFileError(ValueError):
    """An episodes file (or Lake runs folder) that exists but cannot be used."""


class EpisodesNotFoundError(EpisodesFileError, FileNotFoundError):
    """No episodes file where the user pointed."""


# --- episodes files ---------------------------------------------------------------------------


def save_episodes(path: str | os.PathLike[str], episodes: Sequence[Episode], meta: dict[str, Any]) -> None:
    """Write ``episodes`` (moved to the CPU) and ``meta`` to ``path`` atomically.

    ``meta`` records how the tasks were made (run, split, shots, seed...): plain JSON-like values
    only, so the file loads with ``weights_only=True``. ``sha256`` is reserved for the digest.
    """
    if not episodes or not all(isinstance(e, Episode) for e in episodes):
        raise ValueError("episodes must be a non-empty list of Episode; sample them from a task source first")
    _check_meta(meta)
    encoded = [_encode(episode) for episode in episodes]
    payload = {"format": FORMAT, "version": VERSION, "meta": meta, "sha256": _digest(encoded), "episodes": encoded}
    write_atomic(Path(path), lambda f: torch.save(payload, f))


def load_episodes(path: str | os.PathLike[str]) -> tuple[list[Episode], dict[str, Any]]:
    """The episodes (on the CPU) and meta of a file :func:`save_episodes` wrote, after checking its sha256.

    The returned meta also holds ``sha256``, the digest that identifies this task set.
    """
    path = Path(path)
    regenerate = f"write it with `fastmaml episodes RUN_DIR --out {path}`"
    if not path.is_file():
        raise EpisodesNotFoundError(f"episodes file {path} does not exist; {regenerate}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle; all mean the same here
        reason = (str(exc).splitlines() or [""])[0]
        raise EpisodesFileError(
            f"episodes file {path} is unreadable ({type(exc).__name__}: {reason}); it is truncated or not an "
            f"episodes file: {regenerate}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise EpisodesFileError(
            f"{path} is not a fastmaml episodes file (no format={FORMAT!r} marker; a checkpoint?); {regenerate}"
        )
    if payload.get("version") != VERSION:
        raise EpisodesFileError(
            f"{path} is episodes format version {payload.get('version')!r}; this fastmaml reads version {VERSION}: "
            f"upgrade fastmaml or {regenerate}"
        )
    try:
        encoded, meta, digest = payload["episodes"], dict(payload["meta"]), payload["sha256"]
        if _digest(encoded) != digest:
            raise EpisodesFileError(f"episodes file {path} fails its sha256 check: it was damaged; {regenerate}")
        episodes = [_decode(item) for item in encoded]
    except EpisodesFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EpisodesFileError(f"episodes file {path} is malformed ({exc}); {regenerate}") from exc
    return episodes, {**meta, "sha256": digest}


def episodes_digest(episodes: Sequence[Episode]) -> str:
    """The sha256 :func:`load_episodes` reports for a file holding ``episodes`` (names a task set)."""
    return _digest([_encode(episode) for episode in episodes])


def _check_meta(meta: dict[str, Any]) -> None:
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ValueError(f"meta must be a dict with str keys, got {type(meta).__name__}")
    if "sha256" in meta:
        raise ValueError("meta key 'sha256' is reserved for the file's digest; rename it")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"meta must hold plain values (str, int, float, bool, None, lists, dicts) so the file loads with "
            f"weights_only=True: {exc}; convert paths and tensors with str() / .tolist()"
        ) from exc


def _encode(episode: Episode) -> dict[str, dict[str, Any]]:
    """Each field as ``{"data": tensor, "dtype": name, "over255": bool}``; ``over255``: data is uint8 k of k/255."""
    encoded = {}
    for name in FIELDS:
        tensor = getattr(episode, name).detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.is_floating_point():
            scaled = (tensor.float() * 255).round()
            if bool(((scaled >= 0) & (scaled <= 255)).all()):
                pixels = scaled.to(torch.uint8)
                if torch.equal(pixels.to(tensor.dtype).div_(255), tensor):
                    encoded[name] = {"data": pixels, "dtype": dtype, "over255": True}
                    continue
        encoded[name] = {"data": tensor, "dtype": dtype, "over255": False}
    return encoded


def _decode(item: dict[str, dict[str, Any]]) -> Episode:
    tensors = []
    for name in FIELDS:
        entry = item[name]
        data = entry["data"]
        if not isinstance(data, Tensor):
            raise TypeError(f"{name} is a {type(data).__name__}, not a tensor")
        dtype = getattr(torch, entry["dtype"])
        tensors.append(data.to(dtype).div_(255) if entry["over255"] else data.to(dtype))
    return Episode(*tensors)


def _digest(encoded: Sequence[dict[str, dict[str, Any]]]) -> str:
    digest = hashlib.sha256(f"{FORMAT}-{VERSION}".encode())
    for item in encoded:
        for name in FIELDS:
            entry = item[name]
            data = entry["data"].contiguous()
            digest.update(f"{name}:{entry['dtype']}:{entry['over255']}:{data.dtype}:{tuple(data.shape)};".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- Lake et al.'s one-shot runs -------------------------------------------------------------


def load_lake_runs(
    path: str | os.PathLike[str], image_size: int = 28, antialias: bool = True
) -> list[tuple[str, Episode]]:
    """Lake et al.'s one-shot classification runs: ``(run name, Episode)`` per run, sorted by name.

    ``path`` is ``all_runs.zip`` or the folder it extracts to: ``runNN/training/classKK.png`` (one
    drawing per class), ``runNN/test/itemMM.png`` and ``runNN/class_labels.txt`` with lines
    ``runNN/test/itemMM.png runNN/training/classKK.png``. Each run is one task: support = the
    training drawings labelled 0..N-1 in sorted file order (as Lake's ``demo_classification.py``
    sorts them), query = the test items in sorted order with their classes' labels. Drawings get
    the Omniglot store's preprocessing (:func:`fastmaml.tasks.omniglot.decode_drawing`), floats
    ``[1, N, 1, size, size]`` in [0, 1] like sampled episodes.
    """
    with _RunFiles(Path(path)) as files:
        return [(run, _lake_run(files, prefix, run, image_size, antialias)) for prefix, run in files.runs()]


class _RunFiles:
    """The files of a zip or a folder, by ``/``-separated relative path (a context manager: closes the zip)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._archive: zipfile.ZipFile | None = None
        if path.is_dir():
            self.names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        elif path.is_file():
            try:
                self._archive = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise OmniglotDataError(
                    f"{path} is not a readable zip ({exc}); give Lake's {LAKE_SOURCE} or the folder it extracts to"
                ) from exc
            listed = self._archive.namelist()
            self.names = {n for n in listed if not n.endswith("/") and not n.startswith("__MACOSX/")}
        else:
            raise OmniglotNotFoundError(
                f"{path} does not exist; give Lake's {LAKE_SOURCE} or the folder it extracts to"
            )

    def __enter__(self) -> _RunFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._archive is not None:
            self._archive.close()

    def runs(self) -> list[tuple[str, str]]:
        """``(prefix, runNN)`` of every ``[prefix/]runNN/class_labels.txt``, sorted by run."""
        found = sorted(((m["prefix"] or "", m["run"]) for m in map(_LABELS.match, self.names) if m), key=lambda r: r[1])
        if not found:
            raise OmniglotDataError(
                f"{self.path} holds no runNN/class_labels.txt; it is not Lake's one-shot runs ({LAKE_SOURCE})"
            )
        return found

    def read(self, name: str) -> bytes:
        try:
            return self._archive.read(name) if self._archive is not None else (self.path / name).read_bytes()
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise OmniglotDataError(f"{self.path}: {name} cannot be read ({exc}); {_refetch()}") from exc

    def where(self, name: str) -> str:
        return str(self.path / name) if self.path.is_dir() else f"{self.path}: {name}"


def _lake_run(files: _RunFiles, prefix: str, run: str, image_size: int, antialias: bool) -> Episode:
    base = f"{prefix}/" if prefix else ""
    labels_file = f"{base}{run}/class_labels.txt"
    training = sorted(n for n in files.names if _in_folder(n, f"{base}{run}/training/"))
    tests = sorted(n for n in files.names if _in_folder(n, f"{base}{run}/test/"))
    if not training or not tests:
        raise OmniglotDataError(
            f"{files.where(f'{base}{run}')} has no training/*.png or no test/*.png drawings; {_refetch()}"
        )
    label_of = {name: i for i, name in enumerate(training)}
    answers: dict[str, int] = {}
    text = files.read(labels_file).decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pair = line.split()
        problem = ""
        if len(pair) != 2 or not pair[0].startswith(f"{run}/test/") or not pair[1].startswith(f"{run}/training/"):
            problem = f"expected '{run}/test/itemMM.png {run}/training/classKK.png'"
        elif base + pair[0] not in files.names:
            problem = f"{pair[0]} does not exist"
        elif base + pair[1] not in label_of:
            problem = f"{pair[1]} does not exist"
        elif base + pair[0] in answers:
            problem = f"{pair[0]} is labelled twice"
        if problem:
            raise OmniglotDataError(f"{files.where(labels_file)}:{number}: {line.strip()!r}: {problem}; {_refetch()}")
        answers[base + pair[0]] = label_of[base + pair[1]]
    unlabelled = [name for name in tests if name not in answers]
    if unlabelled:
        raise OmniglotDataError(
            f"{files.where(labels_file)} has no line for {', '.join(unlabelled[:3])}"
            f"{' ...' if len(unlabelled) > 3 else ''}; {_refetch()}"
        )

    def pixels(names: list[str]) -> Tensor:
        images = [decode_drawing(files.read(n), files.where(n), image_size, antialias, fix=_refetch()) for n in names]
        return torch.from_numpy(np.stack(images)).unsqueeze(1).unsqueeze(0).to(torch.float32).div_(255)

    support_y = torch.arange(len(training)).unsqueeze(0)
    query_y = torch.tensor([answers[name] for name in tests]).unsqueeze(0)
    return Episode(pixels(training), support_y, pixels(tests), query_y)


def _in_folder(name: str, folder: str) -> bool:
    return name.startswith(folder) and "/" not in name[len(folder) :] and name.lower().endswith(".png")


def _refetch() -> str:
    return f"re-extract Lake's {LAKE_SOURCE}"


# --- evaluation ------------------------------------------------------------------------------


def evaluate_fixed(
    learner: MAML,
    episodes: Sequence[Episode] | Sequence[tuple[str, Episode]],
    steps: int,
    *,
    device: torch.device | str | None = None,
    rule: InnerRule | None = None,
) -> dict[str, Any]:
    """Score ``learner`` on fixed episodes after 0..``steps`` inner steps.

    Returns ``loss`` and ``accuracy`` (``None`` for regression), CPU tensors ``[tasks, steps+1]``
    with one row per task in file order. Given ``(name, episode)`` pairs (:func:`load_lake_runs`)
    it also returns ``runs`` (name -> accuracy per step of that run's tasks) and
    ``error_rate_percent`` per step: the mean over runs of each run's percent error, as Lake et
    al.'s ``demo_classification.py`` reports it.
    """
    named = [item for item in episodes if isinstance(item, tuple)]
    if named and len(named) != len(episodes):
        raise ValueError("give either episodes or (name, episode) pairs, not a mix")
    pairs = list(episodes) if named else [(None, episode) for episode in episodes]
    if not pairs:
        raise ValueError("no episodes to evaluate")
    losses, accuracies, runs = [], [], {}
    for name, episode in pairs:
        if device is not None:
            episode = episode.to(device)
        loss, accuracy = learner.evaluate(episode, steps, rule=rule)
        losses.append(loss.detach().cpu())
        if accuracy is not None:
            accuracies.append(accuracy.detach().cpu())
            if name is not None:
                runs[name] = accuracy.detach().cpu().double().mean(0).tolist()
    result: dict[str, Any] = {
        "steps": steps,
        "loss": torch.cat(losses),
        "accuracy": torch.cat(accuracies) if accuracies else None,
    }
    if runs:
        errors = torch.tensor([[100.0 - 100.0 * a for a in curve] for curve in runs.values()], dtype=torch.float64)
        result["runs"] = runs
        result["error_rate_percent"] = errors.mean(0).tolist()
    return result
