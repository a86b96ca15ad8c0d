"""Few-shot regression from a table: each group of rows (a sensor, a patient, a site) is one task.

The table is a comma-separated file with a header row. ``group`` names the column that says
which task a row belongs to, ``target`` the column to predict, and ``features`` the input
columns; an empty ``features`` means every other column, and then each of them must be numeric:
a column that is not (a name, a date, a typo in one cell) is an error that names it and its
first bad cell, because silently dropping a column whose one cell has a typo would change the
model's inputs without a word. List the feature columns in ``task.features`` to leave text
columns out. Every feature and target cell must be a finite number; the error names the line
and column of the first that is not.

Groups are split into meta-train/val/test either by ``split_seed`` (group names sorted, then
``random.Random(split_seed).shuffle``, then cut 64/16/20 %: the same split on every machine),
or by a YAML/JSON ``split_file`` holding ``train``, ``val`` and ``test`` lists of group names
(groups it does not list are not used). A task draws ``shots`` support and ``queries`` query rows
of one group, without replacement, so support and query never share a row; a group with fewer
than ``shots + queries`` rows cannot be drawn: one warning lists those of the split, and the
rest are used (an error if none remain). Groups are drawn uniformly, so a meta-batch may hold
the same group twice, with different rows.

Features and target are standardised with the mean and (population) standard deviation of every
row of the meta-train groups, in every split, so no statistic leaks from validation or test
groups; a constant column keeps std 1. The source keeps them as :attr:`TableTasks.stats`: map a
model's predictions back to the target's units with ``stats.unstandardize_target(prediction)``,
and standardise new inputs with ``stats.standardize_features(x)``.

Episodes hold float ``support_x [T, K, F]``, ``support_y [T, K, 1]``, ``query_x [T, Q, F]``,
``query_y [T, Q, 1]`` (the layout of :class:`fastmaml.tasks.sinusoid.SinusoidTasks`: MSE on one
output). The standardised rows live on the device in one ``[rows, F]`` store, sorted by group,
with each group's offset and row count; a meta-batch is a few random draws and one gather, no
Python loop over tasks.

Example (a table of 8 sensors with 30 readings each):

>>> import csv, random, tempfile, torch
>>> folder = tempfile.TemporaryDirectory()
>>> path = folder.name + "/readings.csv"
>>> with open(path, "w", newline="") as f:
...     rows = [[f"s{g}", random.random(), random.random(), g + random.random()] for g in range(8) for _ in range(30)]
...     csv.writer(f).writerows([["sensor", "t", "temp", "load"], *rows])
>>> table = load_table(path, group="sensor", target="load")
>>> splits = split_groups(table.group_names, seed=0)
>>> tasks = TableTasks(table, splits["train"], shots=5, queries=10, stats=table_stats(table, splits["train"]))
>>> episode = tasks.sample(4, torch.Generator().manual_seed(0))
>>> episode.shapes()["support_x"], episode.shapes()["query_y"], tasks.input_shape
((4, 5, 2), (4, 10, 1), (2,))
>>> folder.cleanup()
"""

from __future__ import annotations

import csv
import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fastmaml.episode import Episode
from fastmaml.tasks.splits import DEFAULT_FRACTIONS, SPLITS, read_split_file, seeded_split, shorten

if TYPE_CHECKING:
    from fastmaml.config import TaskConfig

KEY_BUDGET = 1 << 22
"""Random sort keys drawn at once (float64: 32 MiB); bigger meta-batches are drawn in task chunks."""


class TableDataError(ValueError):
    """The table or its split file is unusable as configured (bad value, missing column, ...)."""


class TableNotFoundError(TableDataError, FileNotFoundError):
    """The table or split file is not where the config points."""


class SmallGroupsWarning(UserWarning):
    """Some groups have fewer rows than one task needs and are left out of sampling."""


@dataclass(frozen=True)
class Table:
    """A parsed table, unstandardised: ``x [rows, F]`` and ``y [rows]`` float64 in file order.

    ``group_index [rows]`` indexes ``group_names`` (sorted), ``lines [rows]`` is each row's line
    in the file (the header is line 1). The arrays are read-only: tables are shared by a cache.
    """

    path: Path
    group: str
    target: str
    features: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    group_names: tuple[str, ...]
    group_index: np.ndarray
    lines: np.ndarray

    def rows_of(self, groups: Sequence[str]) -> np.ndarray:
        """Indices of the rows of ``groups``, grouped in the order given, file order within a group."""
        position = {name: i for i, name in enumerate(self.group_names)}
        order = np.full(len(self.group_names), -1, dtype=np.int64)
        for rank, name in enumerate(groups):
            order[position[name]] = rank
        ranks = order[self.group_index]
        rows = np.flatnonzero(ranks >= 0)
        return rows[np.argsort(ranks[rows], kind="stable")]

    def group_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.group_index, minlength=len(self.group_names))
        return dict(zip(self.group_names, counts.tolist()))


@dataclass(frozen=True)
class TableStats:
    """Meta-train mean and std of each feature and of the target: standardised = (raw - mean) / std."""

    features: tuple[str, ...]
    target: str
    feature_mean: Tensor
    """``[F]`` float64."""
    feature_std: Tensor
    """``[F]`` float64; 1 for a constant column."""
    target_mean: float
    target_std: float

    def standardize_features(self, x: Tensor) -> Tensor:
        """Raw inputs ``[..., F]`` as the model sees them."""
        return (x - self.feature_mean.to(x)) / self.feature_std.to(x)

    def standardize_target(self, y: Tensor) -> Tensor:
        return (y - self.target_mean) / self.target_std

    def unstandardize_target(self, y: Tensor) -> Tensor:
        """A model's predictions (or query targets) back in the target column's units."""
        return y * self.target_std + self.target_mean

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"features": {name: {mean, std}}, "target": {name: {mean, std}}}``, to save with a run."""
        features = {
            name: {"mean": float(m), "std": float(s)}
            for name, m, s in zip(self.features, self.feature_mean.tolist(), self.feature_std.tolist())
        }
        return {"features": features, "target": {self.target: {"mean": self.target_mean, "std": self.target_std}}}


@dataclass(frozen=True)
class TableIndices:
    """What a meta-batch draws: ``groups [T]`` (positions in :attr:`TableTasks.groups`) and
    ``rows [T, shots + queries]`` (rows of the source's store; the first ``shots`` are the support)."""

    groups: Tensor
    rows: Tensor


# --- reading the table ----------------------------------------------------------------------


def load_table(
    path: str | os.PathLike[str], group: str, target: str, features: Sequence[str] = ()
) -> Table:
    """Parse the CSV at ``path``; ``features`` empty means every column but ``group`` and ``target``.

    Parsed once per file contents: a later call with the same file (same size and modification
    time) and columns returns the same :class:`Table`.
    """
    if not str(path):
        raise TableDataError("task.path is empty; set it to the CSV file of the table, e.g. task.path=data/table.csv")
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise TableNotFoundError(f"table {path} {what}; set task.path to the CSV file of the table")
    for key, value in (("task.group", group), ("task.target", target)):
        if not isinstance(value, str) or not value:
            raise TableDataError(f"{key} is empty; set it to a column of {path} ({_columns_hint(path)})")
    stat = path.stat()
    return _load_table(str(path.resolve()), stat.st_size, stat.st_mtime_ns, group, target, tuple(features))


def _columns_hint(path: Path) -> str:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return "its header could not be read"
    return f"columns: {', '.join(h.strip() for h in header)}" if header else "the file is empty"


@functools.lru_cache(maxsize=4)
def _load_table(path_str: str, size: int, mtime_ns: int, group: str, target: str,
                features: tuple[str, ...]) -> Table:
    del size, mtime_ns  # part of the cache key only
    path = Path(path_str)
    header, records, lines = _read_csv(path)
    column = {name: i for i, name in enumerate(header)}
    available = f"available columns: {', '.join(header)}"
    for key, name in (("task.group", group), ("task.target", target)):
        if name not in column:
            raise TableDataError(f"{path} has no column {name!r} ({key}); {available}")
    if group == target:
        raise TableDataError(f"task.group and task.target are both {group!r}; the target cannot name the task")
    if features:
        _check_features(path, features, column, group, target, available)
        columns = {name: _numeric_column(path, records, lines, column[name], name) for name in features}
    else:
        features = tuple(name for name in header if name not in (group, target))
        if not features:
            raise TableDataError(f"{path} has no column besides group {group!r} and target {target!r} to use as a "
                                 f"feature; add feature columns")
        columns, bad = {}, []
        for name in features:
            values, problem = _parse_column(records, lines, column[name])
            if problem:
                bad.append(f"{name!r} (line {problem[0]}: {problem[1]})")
            else:
                columns[name] = values
        if bad:
            numeric = [name for name in features if name in columns]
            example = f"task.features=[{', '.join(numeric)}]" if numeric else "task.features=[x1, x2]"
            raise TableDataError(
                f"{path}: task.features is empty, so every column but group {group!r} and target {target!r} is a "
                f"feature, and {'this one is' if len(bad) == 1 else 'these are'} not numeric: {shorten(bad)}. List "
                f"the feature columns to use in task.features (e.g. {example}), or fix those values"
            )
    y = _numeric_column(path, records, lines, column[target], target)
    names = []
    for record, line in zip(records, lines):
        name = record[column[group]].strip()
        if not name:
            raise TableDataError(f"{path}, line {line}: group column {group!r} is empty; every row needs its group")
        names.append(name)
    group_names, group_index = np.unique(np.array(names, dtype=str), return_inverse=True)
    x = np.stack([columns[name] for name in features], axis=1)
    arrays = (x, y, group_index.astype(np.int64), np.asarray(lines, dtype=np.int64))
    for array in arrays:
        array.flags.writeable = False
    return Table(path, group, target, tuple(features), arrays[0], arrays[1],
                 tuple(str(n) for n in group_names), arrays[2], arrays[3])


def _read_csv(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, records and each record's line; blank lines are skipped, ragged rows are errors."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(cell.strip() for cell in header):
                raise TableDataError(f"{path} is empty; it needs a header row naming the columns, then one row per "
                                     f"example")
            header = [cell.strip() for cell in header]
            _check_header(path, header)
            records, lines = [], []
            for record in reader:
                if not record or not any(cell.strip() for cell in record):
                    continue
                if len(record) != len(header):
                    raise TableDataError(
                        f"{path}, line {reader.line_num}: {len(record)} values but the header names {len(header)} "
                        f"columns; fix that row (a comma inside a value needs quotes)"
                    )
                records.append(record)
                lines.append(reader.line_num)
    except UnicodeDecodeError as error:
        raise TableDataError(f"{path} is not UTF-8 text ({error}); save it as a UTF-8 CSV file") from error
    except csv.Error as error:
        raise TableDataError(f"{path} is not a readable CSV file ({error}); fix its quoting") from error
    if not records:
        raise TableDataError(f"{path} has a header ({', '.join(header)}) but no rows; add one row per example")
    return header, records, lines


def _check_header(path: Path, header: list[str]) -> None:
    unnamed = [str(i + 1) for i, name in enumerate(header) if not name]
    if unnamed:
        raise TableDataError(f"{path}: column(s) {', '.join(unnamed)} of the header have no name; name every "
                             f"column (a trailing comma adds an empty one)")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise TableDataError(f"{path}: the header names column {name!r} twice; give each column its own name")
        seen.add(name)


def _check_features(path: Path, features: tuple[str, ...], column: dict[str, int], group: str, target: str,
                    available: str) -> None:
    missing = [name for name in features if name not in column]
    if missing:
        raise TableDataError(f"{path} has no column {', '.join(map(repr, missing))} (task.features); {available}")
    for name in features:
        if name in (group, target):
            role = "group" if name == group else "target"
            raise TableDataError(f"task.features lists {name!r}, the {role} column; remove it from task.features")
    if len(set(features)) != len(features):
        twice = sorted({name for name in features if features.count(name) > 1})
        raise TableDataError(f"task.features lists {', '.join(map(repr, twice))} more than once; list each once")


def _numeric_column(path: Path, records: list[list[str]], lines: list[int], index: int, name: str) -> np.ndarray:
    """The column as float64; the first cell that is not a finite number is an error naming its line."""
    values, problem = _parse_column(records, lines, index)
    if problem:
        raise TableDataError(f"{path}, line {problem[0]}, column {name!r}: {problem[1]}")
    return values


def _parse_column(records: list[list[str]], lines: list[int], index: int) -> tuple[np.ndarray, tuple[int, str] | None]:
    """The column as float64, or the line and problem of its first cell that is not a finite number."""
    values = np.empty(len(records), dtype=np.float64)
    for row, record in enumerate(records):
        cell = record[index].strip()
        try:
            value = float(cell)
        except ValueError:
            if not cell:
                return values, (lines[row], "empty (fill in or drop rows with missing values)")
            return values, (lines[row], f"{cell!r} is not a number")
        if not math.isfinite(value):
            return values, (lines[row], f"{cell!r} is not finite")
        values[row] = value
    return values, None


# --- splits ---------------------------------------------------------------------------------


def split_groups(
    names: Sequence[str], seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, list[str]]:
    """Disjoint meta-train/val/test groups (:func:`fastmaml.tasks.splits.seeded_split`)."""
    return seeded_split(names, seed, fractions, units="groups", error=TableDataError)


def read_group_split(path: str | os.PathLike[str], known: Sequence[str]) -> dict[str, list[str]]:
    """The group lists of a split file (:func:`fastmaml.tasks.splits.read_split_file`)."""
    return read_split_file(path, known, units="groups", error=TableDataError, missing=TableNotFoundError,
                           fix="Fix the names or check task.group")


# --- statistics and sampling ----------------------------------------------------------------


def table_stats(table: Table, train_groups: Sequence[str]) -> TableStats:
    """Mean and population std over every row of ``train_groups`` (small groups included)."""
    rows = table.rows_of(train_groups)
    if rows.size == 0:
        raise TableDataError("the meta-train split has no groups; list some under train in task.split_file")
    x, y = table.x[rows], table.y[rows]
    feature_std = x.std(axis=0)
    feature_std[feature_std == 0] = 1.0
    target_std = float(y.std()) or 1.0
    return TableStats(table.features, table.target, torch.from_numpy(x.mean(axis=0)), torch.from_numpy(feature_std),
                      float(y.mean()), target_std)


class TableTasks:
    """Samples regression tasks of ``shots`` support and ``queries`` query rows from ``groups``.

    Rows are standardised by ``stats`` and stored on ``device`` as ``dtype``. Groups with fewer
    than ``shots + queries`` rows are left out (one :class:`SmallGroupsWarning` names them).
    Sampling memory: ``T x (largest group)`` float64 keys, drawn in task chunks past
    :data:`KEY_BUDGET`.
    """

    def __init__(
        self,
        table: Table,
        groups: Sequence[str],
        shots: int,
        queries: int,
        stats: TableStats,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        split: str = "",
    ) -> None:
        for name, value in (("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.shots, self.queries = shots, queries
        self.stats = stats
        self.features, self.target = table.features, table.target
        self.input_shape: tuple[int, ...] = (len(table.features),)
        """``(F,)``: what a model's first layer takes."""
        self.device, self.dtype = torch.device(device), dtype
        label = f"split {split!r}" if split else "the given groups"
        if not groups:
            raise TableDataError(f"{label} of {table.path} has no groups; give it some in task.split_file")
        sizes = table.group_sizes()
        need = shots + queries
        small = [f"{name} ({sizes[name]})" for name in groups if sizes[name] < need]
        self.groups: tuple[str, ...] = tuple(name for name in groups if sizes[name] >= need)
        """Names of the groups tasks are drawn from, in store order."""
        if not self.groups:
            raise TableDataError(
                f"no group of {label} of {table.path} has shots + queries = {shots} + {queries} = {need} rows (the "
                f"largest has {max(sizes[n] for n in groups)}); lower shots or queries, or use larger groups"
            )
        if small:
            warnings.warn(
                f"{len(small)} group(s) of {label} of {table.path} have fewer than shots + queries = {need} rows and "
                f"are not sampled: {shorten(small)}; {len(self.groups)} group(s) remain",
                SmallGroupsWarning, stacklevel=2,
            )
        rows = table.rows_of(self.groups)
        self.source_lines = torch.from_numpy(table.lines[rows].copy())
        """``[rows]``: each store row's line in the CSV file (for checks and debugging)."""
        x = stats.standardize_features(torch.from_numpy(table.x[rows]))
        y = stats.standardize_target(torch.from_numpy(table.y[rows]))
        self._x = x.to(device=self.device, dtype=dtype)
        self._y = y.to(device=self.device, dtype=dtype).unsqueeze(-1)
        counts = torch.tensor([sizes[name] for name in self.groups], dtype=torch.long)
        self._largest = int(counts.max())
        self._index = {counts.device: (counts, torch.cumsum(counts, 0) - counts, torch.arange(self._largest))}

    def __repr__(self) -> str:
        return (f"TableTasks(groups={len(self.groups)}, rows={self._x.shape[0]}, features={list(self.features)}, "
                f"target={self.target!r}, shots={self.shots}, queries={self.queries}, device={self.device})")

    def sample(self, num_tasks: int, generator: torch.Generator) -> Episode:
        """A meta-batch of ``num_tasks`` new tasks."""
        return self.gather(self.sample_indices(num_tasks, generator))

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> TableIndices:
        """A group per task, uniformly, then its rows: the ``shots + queries`` largest of uniform keys
        over the group's rows (keys of other slots are -1, below every real key), in key order.

        Drawn on the generator's device, then moved to the store's.
        """
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        where = generator.device
        counts, offsets, slots = self._index_on(where)
        groups = torch.randint(0, len(self.groups), (num_tasks,), generator=generator, device=where)
        need = self.shots + self.queries
        chunk = max(1, KEY_BUDGET // self._largest)
        parts = []
        for start in range(0, num_tasks, chunk):  # one pass unless T x largest group is over the budget
            g = groups[start:start + chunk]
            keys = torch.rand(g.shape[0], self._largest, generator=generator, device=where, dtype=torch.float64)
            keys.masked_fill_(slots >= counts[g].unsqueeze(1), -1.0)
            parts.append(offsets[g].unsqueeze(1) + keys.topk(need, dim=1).indices)
        rows = torch.cat(parts)
        return TableIndices(groups.to(self.device), rows.to(self.device))

    def _index_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Group counts, offsets and row slots on ``device``, copied there once."""
        if device not in self._index:
            self._index[device] = tuple(t.to(device) for t in next(iter(self._index.values())))
        return self._index[device]

    def gather(self, indices: TableIndices) -> Episode:
        """The standardised rows ``indices`` names, split into support and query."""
        x, y = self._x[indices.rows], self._y[indices.rows]
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


# --- from a run config ----------------------------------------------------------------------


def table_splits(task: TaskConfig, table: Table) -> dict[str, list[str]]:
    """The group split a run config asks for: ``task.split_file`` if set, else seeded by ``task.split_seed``."""
    split_file = getattr(task, "split_file", "")
    if split_file:
        return read_group_split(split_file, table.group_names)
    return split_groups(table.group_names, seed=getattr(task, "split_seed", 0))


def load_table_for(task: TaskConfig) -> Table:
    """The table ``task.path`` with the columns ``task.group``, ``task.target`` and ``task.features``."""
    return load_table(getattr(task, "path", ""), getattr(task, "group", ""), getattr(task, "target", ""),
                      tuple(getattr(task, "features", ()) or ()))


def table_input_shape(task: TaskConfig) -> tuple[int]:
    """``(F,)`` for a run config's table: the number of feature columns (parses the file, once)."""
    return (len(load_table_for(task).features),)


def build_table_tasks(
    task: TaskConfig, split: str, *, shots: int, queries: int, device: torch.device | str
) -> TableTasks:
    """The task source a run config asks for; every split is standardised with the meta-train split's stats."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    table = load_table_for(task)
    splits = table_splits(task, table)
    stats = table_stats(table, splits["train"])
    return TableTasks(table, splits[split], shots, queries, stats, device=device, split=split)
