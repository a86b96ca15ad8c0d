"""A real Omniglot learning run on the official zips: MAML must beat chance clearly, fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from omniglot_fixture import shared_omniglot_dir

from fastmaml.config import load_config
from fastmaml.evaluate import evaluate_run
from fastmaml.plots import plot_episode
from fastmaml.train import train

REAL = shared_omniglot_dir()


@pytest.mark.skipif(REAL is None, reason="real Omniglot zips not found (set FASTMAML_DATA)")
def test_5way_1shot_learns_well_above_chance(tmp_path: Path, real_omniglot_cache: Path) -> None:
    """5-way 1-shot on 200 meta-train characters for 250 iterations, tested on unseen test characters."""
    config = load_config("omniglot_5way1shot", [
        f"task.data_root={REAL}", f"task.cache_dir={real_omniglot_cache}", "task.max_classes=200",
        "task.queries=5", "train.meta_batch=8", "train.iterations=250", "train.val_every=0",
        "train.log_every=50", "train.checkpoint_every=250", "eval.tasks=100", "eval.steps=3", "eval.queries=5",
    ])
    train(config, tmp_path / "run", progress=False)
    accuracy = evaluate_run(tmp_path / "run", "last")["by_shots"]["1"]["accuracy"]["mean"]
    assert accuracy[1] > 0.6, accuracy  # chance is 0.2
    assert accuracy[3] >= accuracy[1] - 0.02, accuracy  # more steps at test do not hurt
    modern = evaluate_run(tmp_path / "run", "last", ["eval.queries=15", "eval.tasks=50"], name="eval_modern")
    assert modern["queries"] == 15 and (tmp_path / "run" / "eval_modern.md").exists()
    assert modern["by_shots"]["1"]["accuracy"]["mean"][1] > 0.6
    assert plot_episode(tmp_path / "run", tmp_path / "episode.png").stat().st_size > 10_000
