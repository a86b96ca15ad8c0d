"""Trainer: real learning, exact resume after SIGKILL, NaN stops, atomic checkpoints, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmaml import checkpoint
from fastmaml.cli import main as cli_main
from fastmaml.config import ConfigError, load_config
from fastmaml.evaluate import evaluate_run, mean_ci95
from fastmaml.experiment import build_learner, build_tasks
from fastmaml.runs import read_metrics
from fastmaml.train import TrainingDiverged, sample_validation, train, validate

QUICK = ["train.meta_batch=10", "train.log_every=20", "train.val_every=100", "train.val_tasks=50",
         "train.checkpoint_every=50", "eval.tasks=100", "eval.batch=100"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    """The loss curve of a run (timing columns excluded: they are the only non-deterministic values)."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r] + [
        (r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]


def test_short_sinusoid_training_learns_to_adapt(tmp_path: Path) -> None:
    """A real short run: adaptation must cut the query MSE well below the unadapted model's."""
    config = load_config("sinusoid", [*QUICK, "train.iterations=1500", "train.meta_batch=25", "eval.shots=[10]"])
    train(config, tmp_path / "run", progress=False)
    results = evaluate_run(tmp_path / "run")
    mse = results["by_shots"]["10"]["loss"]["mean"]
    assert mse[1] < 0.6 * mse[0], mse  # one step helps a lot
    assert mse[10] < mse[1], mse  # and further steps keep helping
    assert mse[10] < 1.0, mse  # an untrained net sits near 3 (the mean of A^2/2)
    assert (tmp_path / "run" / "eval.md").read_text().count("|") > 20


def test_resume_after_sigkill_replays_the_uninterrupted_run(tmp_path: Path) -> None:
    """Kill a training process with SIGKILL mid-run; the resumed loss curve equals an uninterrupted one."""
    args = ["sinusoid", *QUICK, "train.iterations=1200", "train.threads=1"]
    cmd = [sys.executable, "-m", "fastmaml.cli", "train", *args, "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cmd, "--run-dir", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    victim = subprocess.Popen([*cmd, "--run-dir", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.monotonic() + 120
    while not (last.exists() and checkpoint.load(last)["step"] >= 150):
        assert victim.poll() is None, "training finished before it could be killed; make it longer"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = checkpoint.load(last)["step"]
    assert 150 <= killed_at < 1200

    resume = [sys.executable, "-m", "fastmaml.cli", "train", "--resume", str(tmp_path / "killed"), "--no-progress"]
    subprocess.run(resume, check=True, env=env, capture_output=True)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    full = checkpoint.load(tmp_path / "full" / "last.pt")["learner"]
    resumed = checkpoint.load(tmp_path / "killed" / "last.pt")["learner"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_sigint_checkpoints_the_finished_iteration_and_resume_replays_the_run(tmp_path: Path) -> None:
    """Ctrl-C (or SIGTERM from a scheduler) mid-run: the last finished iteration is checkpointed,
    not the last periodic checkpoint, and resuming gives the uninterrupted run's curve and weights."""
    args = ["sinusoid", *QUICK, "train.iterations=1200", "train.threads=1", "train.checkpoint_every=1000"]
    cmd = [sys.executable, "-m", "fastmaml.cli", "train", *args, "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cmd, "--run-dir", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    run = tmp_path / "stopped"
    victim = subprocess.Popen([*cmd, "--run-dir", str(run)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    def reached(step: int) -> bool:
        """Whether the run has logged ``step`` (a line still being written is simply not there yet)."""
        path = run / "metrics.jsonl"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []  # newline-terminated lines only
        return any(json.loads(line).get("step", 0) >= step for line in lines)

    while not reached(100):
        assert victim.poll() is None, "training finished before it could be stopped; make it longer"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGINT)
    _, stderr = victim.communicate(timeout=60)
    assert victim.returncode == 0, stderr.decode()[-2000:]
    state = checkpoint.load(run / "last.pt")
    stopped_at = state["step"]
    assert 100 <= stopped_at < 1000, "the stop must checkpoint its own iteration, not a periodic one"
    event = read_metrics(run)[-1]
    assert event["event"] == "stopped" and event["step"] == stopped_at and "--resume" in event["message"]

    resume = [sys.executable, "-m", "fastmaml.cli", "train", "--resume", str(run), "--no-progress"]
    subprocess.run(resume, check=True, env=env, capture_output=True)
    assert _losses(run) == _losses(tmp_path / "full")
    full = checkpoint.load(tmp_path / "full" / "last.pt")["learner"]
    resumed = checkpoint.load(run / "last.pt")["learner"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastmaml.train as train_module

    real_build = train_module.build_tasks

    class PoisonAfter:
        """Wraps a task source; from call ``n`` on, the targets are NaN."""

        def __init__(self, source, n: int) -> None:
            self.source, self.n, self.calls = source, n, 0

        def sample(self, num_tasks, generator):
            self.calls += 1
            episode = self.source.sample(num_tasks, generator)
            if self.calls < self.n:
                return episode
            return type(episode)(episode.support_x, episode.support_y * float("nan"), episode.query_x,
                                 episode.query_y)

    monkeypatch.setattr(train_module, "build_tasks",
                        lambda config, split, *a, **k: PoisonAfter(real_build(config, split, *a, **k), 130)
                        if split == "train" else real_build(config, split, *a, **k))
    config = load_config("sinusoid", [*QUICK, "train.iterations=400"])
    with pytest.raises(TrainingDiverged, match="iteration 130.*last good checkpoint"):
        train(config, tmp_path / "run", progress=False)
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 100
    assert all(torch.isfinite(v).all() for v in state["learner"].values())
    assert read_metrics(tmp_path / "run")[-1]["event"] == "diverged"


def test_atomic_save_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def exploding_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="unreadable"):
        checkpoint.load(tmp_path / "torn.pt")


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    config = load_config("sinusoid", [*QUICK, "train.iterations=50", "train.val_every=0"])
    train(config, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, tmp_path / "run", progress=False)


def test_cli_train_eval_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli_main(["train", "sinusoid", *QUICK, "train.iterations=200", "--run-dir", str(run), "--no-progress"]) == 0
    assert cli_main(["eval", str(run), "--tasks", "50", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 5 |" in out and "3 steps" in out
    assert json.loads((run / "eval.json").read_text())["tasks"] == 50
    # overrides after options are overrides too; anything else is still refused
    assert cli_main(["eval", str(run), "--checkpoint", "last", "eval.tasks=20", "eval.steps=2", "--name", "late"]) == 0
    assert json.loads((run / "late.json").read_text())["tasks"] == 20
    with pytest.raises(SystemExit):
        cli_main(["eval", str(run), "--checkpoint", "last", "--bogus"])
    with pytest.raises(SystemExit):
        cli_main(["plot", str(run), "eval.tasks=3"])  # plot takes no overrides
    assert cli_main(["plot", str(run)]) == 0
    for name in ("learning_curves.png", "eval_steps.png", "sinusoid_fits.png"):
        assert (run / name).stat().st_size > 10_000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_reports_bad_key_and_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["train", "sinusoid", "train.iteratons=3", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown config key 'train.iteratons'" in capsys.readouterr().err


def test_mean_ci95_matches_textbook_formula() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0], [7.0, 2.0]])
    curve = mean_ci95(values)
    assert curve.mean == pytest.approx([4.0, 2.0])
    # sample std of 1,3,5,7 is sqrt(20/3); CI half-width 1.96 * std / sqrt(4)
    assert curve.ci95 == pytest.approx([1.96 * (20 / 3) ** 0.5 / 2, 0.0])


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data or ../shared/data here: the Omniglot part is skipped
    assert cli_main(["demo", "--out", str(tmp_path), "--iterations", "200"]) == 0
    out = capsys.readouterr().out
    assert out.count("| 5 |") == 2 and "Omniglot skipped" in out
    for name in ("sinusoid_steps.png", "sinusoid_fits.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    tuned = json.loads((tmp_path / "sinusoid_pretrain" / "eval.json").read_text())["inner_lr"]
    assert tuned in load_config("sinusoid_pretrain").eval.tune_lr


def test_mamlpp_run_anneals_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAML++ through the trainer: schedule applied, cosine meta-lr reaches its floor, resume is exact."""
    overrides = [*QUICK, "train.iterations=40", "train.val_every=0", "train.checkpoint_every=20",
                 "train.log_every=10", "meta.algorithm=mamlpp", "meta.inner_steps=2", "meta.msl_iterations=20",
                 "meta.first_order_iterations=10", "train.lr_schedule=cosine", "train.min_outer_lr=1e-5"]
    train(load_config("sinusoid", overrides), tmp_path / "full", progress=False)
    state = checkpoint.load(tmp_path / "full" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)
    assert any(k.startswith("rule_params.") for k in state["learner"])  # learned per-step rates
    lrs = [r["outer_lr"] for r in read_metrics(tmp_path / "full") if "outer_lr" in r]
    assert lrs == sorted(lrs, reverse=True) and len(lrs) == 4

    import fastmaml.train as train_module

    real_build = train_module.build_tasks

    class CrashAfter:
        """A task source that dies on its 26th meta-batch (after the checkpoint at iteration 20)."""

        def __init__(self, source) -> None:
            self.source, self.calls = source, 0

        def sample(self, num_tasks, generator):
            self.calls += 1
            if self.calls > 25:
                raise KeyboardInterrupt
            return self.source.sample(num_tasks, generator)

    monkeypatch.setattr(train_module, "build_tasks", lambda *a, **k: CrashAfter(real_build(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        train(load_config("sinusoid", overrides), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(train_module, "build_tasks", real_build)
    train(load_config("sinusoid", overrides), tmp_path / "resumed", resume=True, progress=False)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")


def test_unknown_lr_schedule_is_named(tmp_path: Path) -> None:
    from fastmaml.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr_schedule.*constant, cosine.*linear"):
        train(load_config("sinusoid", [*QUICK, "train.lr_schedule=linear"]), tmp_path / "r", progress=False)


def test_backward_chunks_train_like_one_backward(tmp_path: Path) -> None:
    base = [*QUICK, "train.iterations=60", "train.val_every=0", "train.checkpoint_every=60"]
    train(load_config("sinusoid", base), tmp_path / "whole", progress=False)
    train(load_config("sinusoid", [*base, "meta.backward_chunk=3"]), tmp_path / "chunked", progress=False)
    whole, chunked = _losses(tmp_path / "whole"), _losses(tmp_path / "chunked")
    assert [s for s, _ in whole] == [s for s, _ in chunked]
    assert [v for _, v in chunked] == pytest.approx([v for _, v in whole], rel=1e-4)


def test_validation_scores_after_val_steps(tmp_path: Path) -> None:
    """train.val_steps=3: validation (and so best.pt) uses the 3-step query loss, not the 1-step one."""
    overrides = [*QUICK, "train.iterations=4", "train.val_every=2", "train.val_tasks=20", "train.checkpoint_every=2"]
    logged = {}
    for steps in (0, 3):
        run = tmp_path / f"steps{steps}"
        train(load_config("sinusoid", [*overrides, f"train.val_steps={steps}"]), run, progress=False)
        logged[steps] = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    learner_state = torch.load(tmp_path / "steps3" / "last.pt", weights_only=False)["learner"]
    config = load_config("sinusoid", overrides)
    learner = build_learner(config, torch.device("cpu"))
    learner.load_state_dict(learner_state)
    episodes = sample_validation(build_tasks(config, "val", torch.device("cpu")), 20, config.eval.batch,
                                 config.train.seed + 2, torch.device("cpu"))
    assert logged[3][-1] == pytest.approx(validate(learner, episodes, 3)["val_loss"], rel=1e-6)
    assert logged[3][-1] != pytest.approx(validate(learner, episodes)["val_loss"], rel=1e-3)
    assert logged[0] != logged[3]
    with pytest.raises(ConfigError, match="'train.val_steps' must be an integer >= 0"):
        load_config("sinusoid", [*overrides, "train.val_steps=-1"])


RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.parametrize("run", sorted(p.name for p in RESULTS.glob("omniglot_*")))
def test_load_rebuilds_every_committed_run_ready_to_adapt(run: str) -> None:
    """fastmaml.load on run directories written by earlier releases: the best checkpoint's weights, adaptable."""
    import fastmaml

    run_dir = RESULTS / run
    learner = fastmaml.load(run_dir)
    saved = checkpoint.load(run_dir / "best.pt")["learner"]
    assert all(torch.equal(v, saved[k]) for k, v in learner.state_dict().items())
    config = load_config(str(run_dir / "config.yaml"))
    ways, shots = config.task.ways, 1
    x = torch.rand(ways * shots, 1, 28, 28)
    model = learner.adapt(x, torch.arange(ways).repeat_interleave(shots), steps=1)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, ways)
