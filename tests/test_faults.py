"""Fault injection: kills, concurrent processes, damaged checkpoints, full disks and bad input.

Each test reproduces a defect of the issue "Dependable runs" on the code before the fix, and states
the guarantee of docs/reliability.md that it proves. Runs are tiny sinusoid runs (a few seconds).
"""

from __future__ import annotations

import errno
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmaml import checkpoint, storage
from fastmaml.cli import main as cli_main
from fastmaml.config import load_config
from fastmaml.runs import PREVIOUS, RunDir, RunLocked, RunLog, read_metrics
from fastmaml.train import train

BASE = ["train.meta_batch=5", "train.log_every=5", "train.val_every=0", "train.checkpoint_every=10",
        "train.threads=1"]
ENV = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _train_cli(run: Path, *overrides: str, resume: bool = False) -> int:
    args = ["train", "--resume", str(run)] if resume else ["train", "sinusoid", "--run-dir", str(run)]
    return cli_main([*args, *BASE, *overrides, "--no-progress"])


def _params(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return checkpoint.load(run / name)["learner"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 40-iteration run: the oracle every interrupted run must equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _train_cli(run, "train.iterations=40") == 0
    return run


# -- 1. resume rules ------------------------------------------------------------------------------

def test_resume_applies_a_changed_outer_lr(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=20") == 0
    before = _params(run)
    assert _train_cli(run, "train.iterations=30", "train.outer_lr=0", resume=True) == 0
    assert _same(_params(run), before)  # a zero learning rate must leave every parameter as it was
    assert checkpoint.load(run / "last.pt")["optimizer"]["param_groups"][0]["lr"] == 0
    assert load_config(str(run / "config.yaml")).train.outer_lr == 0


def test_resume_with_a_new_cosine_length_rederives_the_schedule(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=20", "train.lr_schedule=cosine") == 0
    assert _train_cli(run, "train.iterations=40", resume=True) == 0
    lr = checkpoint.load(run / "last.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.0, abs=1e-12)  # the end of the new 40-iteration schedule, not past its trough
    assert _train_cli(tmp_path / "r2", "train.iterations=20", "train.lr_schedule=cosine") == 0
    assert _train_cli(tmp_path / "r2", "train.iterations=40", "train.outer_lr=0.002", resume=True) == 0
    expected_25 = 0.002 * (1 + math.cos(math.pi * 25 / 40)) / 2  # the new schedule, at the same step
    (logged,) = [r["outer_lr"] for r in read_metrics(tmp_path / "r2") if r["step"] == 25 and "outer_lr" in r]
    assert logged == pytest.approx(expected_25, rel=1e-9)


def test_resume_continues_exactly_when_only_intervals_change(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=20") == 0
    assert _train_cli(run, "train.iterations=40", "train.checkpoint_every=7", "train.threads=1", resume=True) == 0
    assert _same(_params(run), _params(reference))


@pytest.mark.parametrize("override", ["model.hidden=20", "task.shots=5", "meta.algorithm=metasgd",
                                      "meta.first_order=true", "train.seed=3", "train.meta_batch=7"],
                         ids=lambda o: o.split("=")[0])
def test_a_refused_resume_names_the_key_and_leaves_the_run_intact(tmp_path: Path, override: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=10") == 0
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert _train_cli(run, override, resume=True) == 2
    err = capsys.readouterr().err
    assert override.split("=")[0] in err and "Traceback" not in err and "new run" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == files
    assert _train_cli(run, "train.iterations=20", resume=True) == 0  # the plain resume still works


# -- 2. one process per run directory -------------------------------------------------------------

LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from fastmaml.runs import RunDir
    RunDir(sys.argv[1]).open_resume()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_second_process_is_refused_and_a_dead_ones_lock_is_not(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=10") == 0
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        capsys.readouterr()
        assert _train_cli(run, "train.iterations=20", resume=True) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and "in use" in err
        assert max(r["step"] for r in read_metrics(run)) == 10  # nothing appended by the refused process
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert _train_cli(run, "train.iterations=20", resume=True) == 0  # the kernel dropped the dead holder's lock
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [5, 10, 15, 20]


def test_a_fresh_start_on_a_live_run_directory_is_refused(tmp_path: Path) -> None:
    live = RunDir(tmp_path / "run").open_new()
    try:
        with pytest.raises(RunLocked, match=f"process {os.getpid()}"):
            train(load_config("sinusoid", [*BASE, "train.iterations=5"]), tmp_path / "run", progress=False)
    finally:
        live.release()


# -- 3. a fresh start after a kill before the first checkpoint -------------------------------------

def test_a_fresh_start_sets_aside_the_log_of_a_run_killed_before_its_first_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 5, "loss": 9.0}\n{"step": 10, "loss": 8.0}\n')
    (run / "config.yaml").write_text("name: old\n")
    assert _train_cli(run, "train.iterations=10") == 0
    assert "moved it to metrics.jsonl.stale-" in capsys.readouterr().err
    assert [r["loss"] != 9.0 for r in read_metrics(run) if "loss" in r] == [True, True]
    (aside,) = run.glob("metrics.jsonl.stale-*")
    assert "9.0" in aside.read_text()


# -- 4 and 12. nothing written before the run can start --------------------------------------------

def test_a_run_that_cannot_start_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code = cli_main(["train", "omniglot_5way1shot", f"task.data_root={tmp_path / 'nowhere'}", "--run-dir", str(run)])
    assert code == 2 and not run.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "task.data_root" in err


# -- 5 and 6. bad values and bad YAML --------------------------------------------------------------

BAD_VALUES = ["task.shots=-1", "task.shots=0", "train.iterations=-5", "meta.inner_lr=nan", "train.outer_lr=inf",
              "train.meta_batch=0", "train.checkpoint_every=0", "train.log_every=0", "train.threads=-3",
              "train.device=gpu", "meta.strategy=fastest", "eval.shots=[5,0]", "task.ways=two"]


@pytest.mark.parametrize("override", BAD_VALUES)
def test_every_bad_value_exits_2_naming_key_value_and_what_is_allowed(tmp_path: Path, override: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    key, value = override.split("=")
    assert cli_main(["train", "sinusoid", override, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmaml: error:") and err.count("\n") == 1, err
    assert key in err and value.strip("[]").split(",")[-1] in err and "must be" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "problem"), [
    ("name: x\ntrain:\n  iterations: [1, 2\n", "line 4"),
    ("name: x\ntrain: {iterations: 3\n", "line 3"),
    ("name: !!python/object/apply:os.system ['echo owned > {marker}']\n", "line 1"),
], ids=["unclosed-list", "unclosed-mapping", "python-tag"])
def test_yaml_problems_are_one_line_naming_file_and_line(tmp_path: Path, text: str, problem: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    marker = tmp_path / "owned"
    path.write_text(text.replace("{marker}", str(marker)))
    assert cli_main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err and err.count("\n") == 1, err
    assert not marker.exists()


# -- 7. checkpoint integrity -----------------------------------------------------------------------

def _flip(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, reference: Path,
                                                                   damage: str) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=30") == 0
    assert checkpoint.load(run / PREVIOUS)["step"] == 20
    last = run / "last.pt"
    if damage == "flip":
        _flip(last)
        with pytest.raises(checkpoint.CheckpointError, match="checksum"):
            checkpoint.load(last)
    elif damage == "truncate":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        last.unlink()
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        assert _train_cli(run, "train.iterations=40", resume=True) == 0
    assert _same(_params(run), _params(reference))  # iterations 21-30 trained again, exactly
    assert _curve(run) == _curve(reference)


def test_both_checkpoints_damaged_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=20") == 0
    _flip(run / "last.pt")
    _flip(run / PREVIOUS)
    capsys.readouterr()
    assert _train_cli(run, "train.iterations=30", resume=True) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "previous checkpoint" in err and "new run" in err


def test_checkpoints_written_before_checksums_still_load(tmp_path: Path) -> None:
    torch.save({"step": 3, "w": torch.ones(2)}, tmp_path / "old.pt")
    assert checkpoint.load(tmp_path / "old.pt")["step"] == 3


# -- 8. metrics truncation on resume is atomic ------------------------------------------------------

def test_a_kill_during_the_metrics_rewrite_leaves_the_old_file(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 9)))
    before = (tmp_path / "metrics.jsonl").read_bytes()

    def killed(path: Path, write) -> None:  # noqa: ANN001
        raise KeyboardInterrupt  # the process dies while the new file is being written

    monkeypatch.setattr("fastmaml.runs.write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        RunLog(tmp_path, resume_step=4, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    monkeypatch.undo()
    RunLog(tmp_path, resume_step=4, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


# -- 9. orphan temp files --------------------------------------------------------------------------

def test_orphan_temp_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".last.pt.{dead.stdout.strip()}.abc123.tmp"
    old_style = tmp_path / ".last.pt.k2j3h4.tmp"
    live = tmp_path / f".last.pt.{os.getppid()}.xyz789.tmp"
    for path in (orphan, old_style, live):
        path.write_bytes(b"half a checkpoint")
    os.utime(old_style, (time.time() - 2 * storage.STALE_FOREIGN_TEMP_S,) * 2)
    checkpoint.save_atomic({"step": 1}, tmp_path / "last.pt")
    assert not orphan.exists() and not old_style.exists() and live.exists()


def test_resume_removes_temp_files_a_killed_run_left(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=10") == 0
    orphan = run / f".metrics.jsonl.{2 ** 22 + 7}.q.tmp"  # above the default pid_max: no such process
    orphan.write_bytes(b"{")
    assert _train_cli(run, "train.iterations=20", resume=True) == 0
    assert not orphan.exists()


# -- 10. a full disk -------------------------------------------------------------------------------

def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _train_cli(run, "train.iterations=10") == 0
    real_save = torch.save

    def full(obj, f) -> None:  # noqa: ANN001
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert _train_cli(run, "train.iterations=20", resume=True) == 1
    err = capsys.readouterr().err
    assert "full" in err and str(run) in err and "Traceback" not in err
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load(run / "last.pt")["step"] == 10
    assert not list(run.glob(".*.tmp"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a small tmpfs (where this machine allows mounting one): fill it, resume, then free it."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (not root); the ENOSPC test above covers the same path")
    try:
        run = disk / "run"
        assert _train_cli(run, "train.iterations=10") == 0
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as error:
                assert error.errno == errno.ENOSPC
        capsys.readouterr()
        assert _train_cli(run, "train.iterations=20", "train.log_every=100", resume=True) == 1
        err = capsys.readouterr().err
        assert "full" in err and str(disk) in err
        assert checkpoint.load(run / "last.pt")["step"] == 10
        filler.unlink()
        assert _train_cli(run, "train.iterations=20", resume=True) == 0
        assert checkpoint.load(run / "last.pt")["step"] == 20
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- SIGKILL at chosen and random moments ------------------------------------------------------------

KILL_DURING = textwrap.dedent("""
    import os, signal, sys
    import fastmaml.storage, fastmaml.runs
    what, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = [0]
    def die_on(count_call):
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
    if what == "checkpoint":  # after the temp file is written and fsynced, before the rename
        real = fastmaml.storage.os.fsync
        def fsync(fd):
            real(fd)
            die_on(fd)
        fastmaml.storage.os.fsync = fsync
    else:  # half a metrics line written
        real_write = fastmaml.runs.RunLog.write
        def write(self, step, **values):
            if calls[0] + 1 == count:
                self._file.write('{"step": ' + str(step) + ', "lo')
                self._file.flush()
            die_on(None)
            real_write(self, step, **values)
        fastmaml.runs.RunLog.write = write
    from fastmaml.cli import main
    sys.exit(main(argv))
""")


@pytest.mark.parametrize(("what", "count"), [("checkpoint", 5), ("checkpoint", 8), ("metrics", 4), ("metrics", 7)])
def test_sigkill_during_a_write_then_resume_is_bit_identical(tmp_path: Path, reference: Path, what: str,
                                                              count: int) -> None:
    run = tmp_path / "run"
    argv = ["train", "sinusoid", "--run-dir", str(run), *BASE, "train.iterations=40", "--no-progress"]
    victim = subprocess.run([sys.executable, "-c", KILL_DURING, what, str(count), *argv], env=ENV,
                            capture_output=True)
    assert victim.returncode == -signal.SIGKILL, victim.stderr.decode()[-2000:]
    assert _train_cli(run, "train.iterations=40", resume=True) == 0
    assert _same(_params(run), _params(reference))
    assert _curve(run) == _curve(reference)


def test_sigkill_at_random_moments_loses_nothing_beyond_the_interval(tmp_path: Path, reference: Path) -> None:
    """Three kills at random times in one run, each followed by a resume: the end equals the reference."""
    run, rng = tmp_path / "run", random.Random(int(os.environ.get("FAULT_SEED", "0")))
    argv = [sys.executable, "-m", "fastmaml.cli", "train", *BASE, "train.iterations=40", "--no-progress"]
    first = True
    for _ in range(3):
        cmd = [*argv[:4], "--resume", str(run), *argv[4:]] if not first else [*argv[:4], "sinusoid", "--run-dir",
                                                                               str(run), *argv[4:]]
        victim = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 4.0))  # interpreter start-up plus a random part of the 40 iterations
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        first = first and not RunDir(run).has_checkpoint()
    if RunDir(run).has_checkpoint():
        assert _train_cli(run, "train.iterations=40", resume=True) == 0
    else:
        assert _train_cli(run, "train.iterations=40") == 0
    assert _same(_params(run), _params(reference))
    assert _curve(run) == _curve(reference)


def test_a_full_disk_hidden_in_a_runtime_error_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer can report a failed write as RuntimeError('[enforce fail at inline_container.cc...')."""
    checkpoint.save_atomic({"step": 1}, tmp_path / "last.pt")

    def failing(obj, f) -> None:  # noqa: ANN001
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: type("U", (), {"free": 0})())
    with pytest.raises(storage.DiskFullError, match="is full"):
        checkpoint.save_atomic({"step": 2}, tmp_path / "last.pt")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 << 30})())
    with pytest.raises(RuntimeError, match="enforce fail"):  # not a full disk: the error as it was
        checkpoint.save_atomic({"step": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 1


def test_an_unusable_cache_folder_and_a_full_one_are_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "images" / "a").mkdir(parents=True)
    for c in "abcdefgh":
        (tmp_path / "images" / c).mkdir(exist_ok=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    (tmp_path / "a_file").write_text("not a folder")
    args = ["train", "folder_5way1shot", f"task.data_root={tmp_path / 'images'}", "task.ways=2", "task.shots=1",
            "task.queries=1", "task.image_size=8", "--run-dir", str(tmp_path / "run")]
    assert cli_main([*args, f"task.cache_dir={tmp_path / 'a_file' / 'cache'}"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the "decoding ... once" line
    assert last.startswith("fastmaml: error:") and "FASTMAML_CACHE" in last and "Traceback" not in err, err

    def full(path: Path, write) -> None:  # noqa: ANN001
        raise storage.DiskFullError(errno.ENOSPC, f"the disk holding {Path(path).parent} is full")

    monkeypatch.setattr("fastmaml.tasks.folder.write_atomic", full)
    assert cli_main([*args, f"task.cache_dir={tmp_path / 'cache'}"]) == 1
    assert "is full" in capsys.readouterr().err and not (tmp_path / "run").exists()
