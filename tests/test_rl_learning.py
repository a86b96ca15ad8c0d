"""A real meta-RL learning run in CI: MAML-TRPO on 2D navigation with the paper's settings."""

from __future__ import annotations

from pathlib import Path

from fastmaml.config import PRESET_DIR
from fastmaml.rl.config import load_rl_config
from fastmaml.rl.runner import evaluate_rl_run, train_rl

ITERATIONS = 25


def test_maml_trpo_learns_to_navigate_in_a_few_meta_iterations(tmp_path: Path) -> None:
    """Paper settings (20 tasks x 20 episodes, alpha 0.1, KL 0.01, exact second order) for 25 meta-iterations,
    then 40 fixed test goals: one policy-gradient step must bring the agent close to its goal."""
    config = load_rl_config(str(PRESET_DIR / "rl" / "navigation2d.yaml"),
                            [f"train.iterations={ITERATIONS}", "train.checkpoint_every=25", "eval.steps=1"])
    train_rl(config, tmp_path / "run", progress=False)
    result = evaluate_rl_run(tmp_path / "run")
    pre, post = result["return"]["mean"]
    assert post > -20, result["return"]
    assert post - pre > 15, result["return"]
