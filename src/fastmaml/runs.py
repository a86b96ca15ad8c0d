"""The run directory, owned in one place: layout, lock, config file, checkpoints, metrics, resume rules.

Supervised and meta-RL training write runs through :class:`RunDir`; evaluation, plots and the
CLI read them through it. What it promises (each promise has a test; see docs/reliability.md):

- one process at a time trains in a run directory (an ``flock`` the kernel drops when the process
  dies, so a killed run never blocks its own resume);
- nothing is written until the run can start, and then every file is replaced atomically;
- ``last.pt`` is checksummed and the one before it is kept as ``last.prev.pt``: a damaged newest
  checkpoint falls back to the previous one by itself, with a warning;
- ``metrics.jsonl`` reads as one uninterrupted run after any resume;
- a resume may change how a run continues (iterations, learning rate, intervals, device), never
  what its checkpoint means (model, task, algorithm): the latter is refused, naming the key.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastmaml import checkpoint
from fastmaml.checkpoint import CheckpointError
from fastmaml.config import Config, ConfigError, apply_overrides, from_dict, parse_yaml
from fastmaml.storage import FULL_DISK_ERRORS, DiskFullError, remove_stale_temps, write_atomic

CONFIG, LAST, PREVIOUS, BEST, INIT = "config.yaml", "last.pt", "last.prev.pt", "best.pt", "init.pt"
METRICS, TENSORBOARD, LOCK = "metrics.jsonl", "tensorboard", ".lock"

RESUMABLE = (
    "name", "train.iterations", "train.outer_lr", "train.min_outer_lr", "train.grad_clip", "train.log_every",
    "train.val_every", "train.val_tasks", "train.val_steps", "train.checkpoint_every", "train.threads",
    "train.device", "train.reuse_freed_memory", "task.data_root", "task.cache_dir", "meta.strategy",
    "meta.chunk_size", "meta.backward_chunk", "meta.checkpoint", "meta.task_threads", "meta.compile",
    "meta.compile_mode", "meta.precision", "eval.*",
)
"""Config keys a ``--resume`` may change (supervised runs): how the run continues and where it runs."""


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


class RunLocked(RunError):
    """Another live process is training in the run directory."""


class TrainingDiverged(RuntimeError):
    """The meta-loss or meta-gradient became NaN or infinite; the last good checkpoint is kept."""


def stopped_message(run: RunDir, unit: str, step: int) -> str:
    """The ``stopped`` event's message of both training loops."""
    return f"stopped by a signal after {unit} {step}; checkpointed to {run / LAST}: continue with --resume"


def diverged(run: RunDir, what: str, fix: str) -> TrainingDiverged:
    """The error both training loops raise on a non-finite value, with the fix for that loop."""
    return TrainingDiverged(f"{what}: training stopped. The last good checkpoint ({run / LAST}, if any) is kept. {fix}")


class StopRequest:
    """Set by SIGINT / SIGTERM while training: finish the iteration, checkpoint it, return.

    The first signal asks for a clean stop (no finished iteration is lost, ``--resume`` goes on
    from it); a second one restores the default handlers, so it interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle the signals from now on (only the main thread may; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.requested = True
        self.uninstall()


class RunDir:
    """One run directory. Reading needs nothing; writing needs :meth:`open_new` or :meth:`open_resume`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_handle: int | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- reading ---------------------------------------------------------------------------------

    def read_config_data(self) -> dict[str, Any]:
        """The mapping in ``config.yaml``; a missing file says this is not a run directory."""
        path = self / CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} has no {CONFIG}; is it a fastmaml run directory?")
        data = parse_yaml(path.read_text(), str(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return data

    def has_checkpoint(self) -> bool:
        return (self / LAST).exists() or (self / PREVIOUS).exists()

    def load_checkpoint(self, which: str = "last", map_location: Any = "cpu") -> dict[str, Any]:
        """``last`` (falling back to ``last.prev.pt`` with a warning), ``best`` (else last) or ``init``."""
        if which == "best":
            return checkpoint.load(self / BEST, map_location) if (self / BEST).exists() else self.load_last(
                map_location)
        if which == "init":
            return checkpoint.load(self / INIT, map_location)
        if which != "last":
            raise ValueError(f"checkpoint {which!r}: use best, last or init")
        return self.load_last(map_location)

    def checkpoint_name(self, which: str) -> str:
        """The file :meth:`load_checkpoint` reads first for ``which``."""
        if which == "best" and (self / BEST).exists():
            return BEST
        return INIT if which == "init" else LAST

    def load_last(self, map_location: Any = "cpu") -> dict[str, Any]:
        """The newest trustworthy checkpoint: ``last.pt``, else ``last.prev.pt`` (said in a warning)."""
        last, previous = self / LAST, self / PREVIOUS
        if not last.exists() and not previous.exists():
            raise FileNotFoundError(f"{self.path} holds no checkpoint ({LAST}); train first, or check the path")
        problem = "is missing"
        if last.exists():
            try:
                return checkpoint.load(last, map_location)
            except CheckpointError as error:
                problem = f"is damaged ({error})"
        if not previous.exists():
            raise RunError(f"{last} {problem} and there is no {PREVIOUS} to fall back to: start a new run "
                           f"(another --run-dir), or restore {last} from a backup")
        try:
            state = checkpoint.load(previous, map_location)
        except CheckpointError as error:
            raise RunError(f"{last} {problem}, and so is the previous checkpoint ({error}); start a new run "
                           "(another --run-dir), or restore them from a backup") from None
        warnings.warn(f"{last} {problem}; resuming from the previous checkpoint {previous} instead "
                      f"(step {_step_of(state)}): the iterations after it are trained again", RuntimeWarning,
                      stacklevel=2)
        return state

    # -- owning ----------------------------------------------------------------------------------

    def open_new(self) -> RunDir:
        """Create and lock the directory for a fresh run; refuse one that already holds a run.

        Logs left by a run killed before its first checkpoint are set aside (``*.stale-<time>``),
        so the new run starts a clean record.
        """
        if self.has_checkpoint():
            raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it, or another "
                                  "--run-dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if self.has_checkpoint():  # a run that started between the check and the lock
            self.release()
            raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in (METRICS, TENSORBOARD):
            if (self / name).exists():
                aside = self / f"{name}.stale-{stamp}"
                os.replace(self / name, aside)
                print(f"fastmaml: {self / name} is from an earlier run that stopped before its first checkpoint; "
                      f"moved it to {aside.name}", file=sys.stderr)
        return self

    def open_resume(self) -> RunDir:
        """Lock an existing run directory to continue it."""
        if not (self / CONFIG).is_file():
            raise FileNotFoundError(f"{self.path} has no {CONFIG}; is it a fastmaml run directory?")
        self._lock()
        return self

    def release(self) -> None:
        if self._lock_handle is not None:
            os.close(self._lock_handle)  # closing drops the flock
            self._lock_handle = None

    def _lock(self) -> None:
        handle = os.open(self / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(handle, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(handle)
            raise RunLocked(f"{self.path} is in use by {owner}; wait for it to finish or stop it, then "
                            f"resume with: fastmaml train --resume {self.path}") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%c')}: "
                  f"{' '.join(sys.argv)[:300]}\n".encode(), 0)
        self._lock_handle = handle
        for name in (CONFIG, LAST, PREVIOUS, BEST, INIT, METRICS):  # we are the only writer: old temps are orphans
            remove_stale_temps(self / name)

    # -- writing (only while locked) ---------------------------------------------------------------

    def write_config(self, config: Any) -> None:
        import yaml

        text = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
        write_atomic(self / CONFIG, lambda f: f.write(text.encode()))

    def save_last(self, state: dict[str, Any]) -> None:
        """Write ``last.pt``; the checkpoint it replaces becomes ``last.prev.pt`` first.

        The previous file is hard-linked to its new name before the new one is renamed in, so at
        every instant ``last.pt`` is a whole, checksummed checkpoint.
        """
        last = self / LAST
        if last.exists():
            _link_atomic(last, self / PREVIOUS)
        checkpoint.save_atomic(state, last)

    def save(self, name: str, state: dict[str, Any]) -> None:
        checkpoint.save_atomic(state, self / name)

    def write_text(self, name: str, text: str) -> Path:
        write_atomic(self / name, lambda f: f.write(text.encode()))
        return self / name


def load_run_config(run_dir: str | os.PathLike[str], overrides: list[str] | None = None) -> Config:
    """A supervised run's saved config, with ``section.key=value`` overrides applied."""
    run = RunDir(run_dir)
    return apply_overrides(from_dict(run.read_config_data(), source=str(run / CONFIG)), overrides or [])


def check_resume_changes(saved: dict[str, Any], wanted: dict[str, Any], resumable: Iterable[str] = RESUMABLE) -> None:
    """Refuse a resume that changes what the checkpoint means, naming each such key."""
    allowed = tuple(resumable)
    changed = [(key, old, new) for key, old, new in _differences(saved, wanted)
               if not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed)]
    if changed:
        listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        raise RunError(f"--resume cannot change {listing}: the checkpoint was trained with the old value. Drop "
                       "the override to continue this run, or start a new run (another --run-dir) with it")


def _differences(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{prefix}{key}.")
        elif key in saved and old != new:  # keys new since the checkpoint take their defaults
            out.append((prefix + key, old, new))
    return out


class RunLog:
    """Appends ``{"step": ..., ...}`` lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, lines past the checkpoint's step (written by the interrupted process after its last
    checkpoint) are dropped by an atomic rewrite, so the file reads as one uninterrupted run and a
    kill during the rewrite leaves the old file.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS
        if resume_step is not None and self.path.exists():
            kept = "".join(line + "\n" for line in self.path.read_text().splitlines() if _step(line) <= resume_step)
            write_atomic(self.path, lambda f: f.write(kept.encode()))
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD), purge_step=resume_step)

    def write(self, step: int, **values: Any) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:
            if error.errno in FULL_DISK_ERRORS:
                raise DiskFullError(error.errno, f"the disk holding {self.path.parent} is full while appending to "
                                    f"{self.path.name}; the checkpoints there are intact. Free space, then "
                                    f"fastmaml train --resume {self.path.parent}") from error
            raise
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # a full disk fails the last flush too; the error that stopped the run is raised already
            pass
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a torn last line from a killed process is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _link_atomic(source: Path, target: Path) -> None:
    """Make ``target`` a second name of ``source``'s file, replacing ``target`` atomically."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:  # a file system without hard links: copy (still atomic by the rename below)
        temp.write_bytes(source.read_bytes())
    os.replace(temp, target)


def _step_of(state: dict[str, Any]) -> Any:
    return state.get("step", state.get("iteration", "?"))


def _step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a killed process: drop it


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
