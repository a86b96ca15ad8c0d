"""Meta-RL runs through the CLI: config errors, exact resume, NaN stops, evaluation, figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmaml import checkpoint
from fastmaml.cli import main as cli_main
from fastmaml.config import PRESET_DIR, ConfigError
from fastmaml.rl import metarl, runner
from fastmaml.rl.config import load_rl_config
from fastmaml.runs import read_metrics
from fastmaml.train import TrainingDiverged

TINY = ["train.meta_batch=3", "train.rollouts=4", "policy.hidden=[16]", "train.checkpoint_every=1",
        "eval.tasks=4", "eval.rollouts=3", "eval.steps=2"]
NAV = str(PRESET_DIR / "rl" / "navigation2d.yaml")


def _record(run_dir: Path) -> list[dict]:
    """Metrics without the wall-clock columns (the only values that may differ between runs)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(run_dir)]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (PRESET_DIR / "rl").glob("*.yaml")))
def test_rl_presets_load(preset: str) -> None:
    config = load_rl_config(f"rl/{preset}")
    assert config.env.name in preset
    assert config.train.meta_batch in (20, 40) and config.outer.max_kl == 0.01 and config.meta.inner_lr == 0.1


@pytest.mark.parametrize(("override", "message"), [
    ("outer.max_kll=0.1", "unknown config key 'outer.max_kll'"),
    ("outer.hvp=magic", "'outer.hvp' is 'magic'; valid: exact, finite-difference, first-order"),
    ("env.name=walker", "'env.name' is 'walker'"),
    ("train.rollouts=many", "'train.rollouts' must be an integer"),
    ("meta.inner_steps=0", "meta.inner_steps must be >= 1"),
    ("train.iterations=-5", "'train.iterations' must be an integer >= 1, got -5"),
    ("meta.inner_lr=nan", "'meta.inner_lr' must be a finite number >= 0"),
    ("eval.tasks=0", "'eval.tasks' must be an integer >= 1"),
])
def test_rl_config_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_rl_config(NAV, [override])


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """4 meta-iterations straight == 2, then `train --resume` for 2 more: same metrics, same policy."""
    assert cli_main(["train", NAV, *TINY, "train.iterations=4", "--run-dir", str(tmp_path / "a"),
                     "--no-progress"]) == 0
    assert cli_main(["train", NAV, *TINY, "train.iterations=2", "--run-dir", str(tmp_path / "b"),
                     "--no-progress"]) == 0
    assert cli_main(["train", "--resume", str(tmp_path / "b"), "train.iterations=4", "--no-progress"]) == 0
    a, b = (checkpoint.load(tmp_path / r / "last.pt") for r in ("a", "b"))
    assert a["iteration"] == b["iteration"] == 4
    for name in a["theta"]:
        torch.testing.assert_close(a["theta"][name], b["theta"][name], rtol=0, atol=0)
    assert _record(tmp_path / "a") == _record(tmp_path / "b")
    init = checkpoint.load(tmp_path / "a" / "init.pt")
    assert any((init["theta"][k] != a["theta"][k]).any() for k in init["theta"])  # it did train
    with pytest.raises(FileExistsError, match="--resume"):
        runner.train_rl(load_rl_config(NAV, TINY), tmp_path / "a", progress=False)


def test_resume_refuses_a_changed_inner_step_and_applies_a_changed_trust_region(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli_main(["train", NAV, *TINY, "train.iterations=1", "--run-dir", str(run), "--no-progress"]) == 0
    config = (run / "config.yaml").read_bytes()
    assert cli_main(["train", "--resume", str(run), "meta.inner_lr=0.5", "train.iterations=2", "--no-progress"]) == 2
    assert "meta.inner_lr: 0.1 -> 0.5" in capsys.readouterr().err and (run / "config.yaml").read_bytes() == config
    assert cli_main(["train", "--resume", str(run), "outer.max_kl=0.02", "train.iterations=2", "--no-progress"]) == 0
    assert load_rl_config(str(run / "config.yaml")).outer.max_kl == 0.02


def test_sigint_stops_after_the_meta_iteration_and_checkpoints_it(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during meta-iteration 2 of 6 (checkpoints every 5): iteration 2 is saved, and the
    default handler is back afterwards; resuming reaches the uninterrupted run's policy."""
    import os
    import signal

    real_collect, calls = metarl.collect, []

    def interrupt_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_collect(*args, **kwargs)

    config = [*TINY, "train.checkpoint_every=5", "train.iterations=6"]
    runner.train_rl(load_rl_config(NAV, config), tmp_path / "full", progress=False)
    monkeypatch.setattr(metarl, "collect", interrupt_on_second)
    result = runner.train_rl(load_rl_config(NAV, config), tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert result["iteration"] == 2 and checkpoint.load(tmp_path / "run" / "last.pt")["iteration"] == 2
    assert read_metrics(tmp_path / "run")[-1]["event"] == "stopped"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert cli_main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    full, resumed = (checkpoint.load(tmp_path / r / "last.pt")["theta"] for r in ("full", "run"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0)


def test_ppo_outer_step_resumes_exactly_with_its_optimizer_state(tmp_path: Path) -> None:
    ppo = [*TINY, "outer.method=ppo", "meta.first_order=true"]
    runner.train_rl(load_rl_config(NAV, [*ppo, "train.iterations=3"]), tmp_path / "a", progress=False)
    runner.train_rl(load_rl_config(NAV, [*ppo, "train.iterations=2"]), tmp_path / "b", progress=False)
    runner.train_rl(runner.load_run_rl_config(tmp_path / "b", ["train.iterations=3"]), tmp_path / "b", resume=True,
                    progress=False)
    a, b = (checkpoint.load(tmp_path / r / "last.pt") for r in ("a", "b"))
    assert a["ppo"]["state"] and a["iteration"] == b["iteration"] == 3
    for name in a["theta"]:
        torch.testing.assert_close(a["theta"][name], b["theta"][name], rtol=0, atol=0)
    assert _record(tmp_path / "a") == _record(tmp_path / "b")


def test_non_finite_returns_stop_the_run_and_keep_the_checkpoint(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_collect = metarl.collect
    calls = {"n": 0}

    def collect_then_nan(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        meta = real_collect(*args, **kwargs)
        if calls["n"] == 3:
            meta.returns[-1] = float("nan")
        return meta

    monkeypatch.setattr(metarl, "collect", collect_then_nan)
    config = load_rl_config(NAV, [*TINY, "train.iterations=5"])
    with pytest.raises(TrainingDiverged, match="meta-iteration 3"):
        runner.train_rl(config, tmp_path / "run", progress=False)
    assert checkpoint.load(tmp_path / "run" / "last.pt")["iteration"] == 2


def test_eval_reports_each_step_and_the_init_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert cli_main(["train", NAV, *TINY, "train.iterations=1", "--run-dir", str(run), "--no-progress"]) == 0
    assert cli_main(["eval", str(run)]) == 0
    assert "| 2 |" in capsys.readouterr().out
    assert cli_main(["eval", str(run), "--checkpoint", "init", "--name", "eval_init"]) == 0
    maml, init = (json.loads((run / f"{n}.json").read_text()) for n in ("eval", "eval_init"))
    assert len(maml["return"]["mean"]) == 3 and init["iteration"] == 0 and maml["iteration"] == 1
    assert all(np.isfinite(maml["return"]["mean"])) and all(c >= 0 for c in maml["return"]["ci95"])
    # the same fixed test tasks and noise: evaluating twice gives the same numbers
    assert cli_main(["eval", str(run), "--name", "again"]) == 0
    assert json.loads((run / "again.json").read_text())["return"] == maml["return"]
    assert cli_main(["plot", str(run), "--compare", str(run / "eval_init.json"), "--labels", "MAML", "random"]) == 0
    assert (run / "return_vs_steps.png").stat().st_size > 1000 and (run / "learning_curves.png").exists()


def test_pretrain_baseline_trains_without_inner_steps(tmp_path: Path) -> None:
    config = load_rl_config(str(PRESET_DIR / "rl" / "navigation2d_pretrain.yaml"), [*TINY, "train.iterations=2"])
    runner.train_rl(config, tmp_path / "run", progress=False)
    records = read_metrics(tmp_path / "run")
    assert all("return_step1" not in r and r["pre_return"] == r["post_return"] for r in records)
