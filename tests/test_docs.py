"""Every example in the docs runs: the README's API example and the docstring examples."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import torch

import fastmaml.learners

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_and_learns(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "README lost its API example or its fit example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    model, x = namespace["model"], namespace["x_new"]
    error = (model(x) - 2 * torch.sin(x)).square().mean().item()
    assert error < 1.0, f"the README's adapted model fits its 10 points badly (MSE {error:.3f})"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[1], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["result"]["step"] == 200 and (tmp_path / "runs" / "mine" / "best.pt").exists()


def test_docstring_examples() -> None:
    result = doctest.testmod(fastmaml.learners, verbose=False)
    assert result.attempted > 0 and result.failed == 0


OWN_DATA = README.parent / "docs" / "own-data.md"


def test_own_data_python_walkthrough_runs(tmp_path, monkeypatch) -> None:
    """docs/own-data.md's Python blocks, as written, with the iteration counts cut for CI."""
    import fastmaml.tasks.protocol
    from fastmaml.cli import main as cli_main
    from fastmaml.runs import read_metrics

    blocks = re.findall(r"```python\n(.*?)```", OWN_DATA.read_text(), flags=re.S)
    assert len(blocks) == 2, "docs/own-data.md lost one of its Python examples"
    monkeypatch.chdir(tmp_path)
    fit_example = blocks[0].replace("iterations=2000", "iterations=4").replace("iterations=4000", "iterations=8")
    fit_example = fit_example.replace("val_every=500", "val_every=4").replace("checkpoint_every=500",
                                                                               "checkpoint_every=4")
    namespace: dict = {}
    exec(compile(fit_example, "own-data.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["result"]["step"] == 4
    assert max(r["step"] for r in read_metrics(tmp_path / "runs" / "python")) == 8  # the resumed run went on
    (tmp_path / "my_tasks.py").write_text(blocks[1].split("\n", 1)[1])
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train", "sinusoid", "task.name=python", "task.factory=my_tasks:tasks", "task.kind=regression",
            "model.name=python", "model.factory=my_tasks:model", "--run-dir", "runs/lines", "train.iterations=20",
            "train.val_every=10", "train.val_tasks=10", "train.checkpoint_every=10", "eval.tasks=10", "--no-progress"]
    assert cli_main(args) == 0 and cli_main(["eval", "runs/lines"]) == 0
    assert doctest.testmod(fastmaml.tasks.protocol).failed == 0


MIGRATION = README.parent / "docs" / "migrating-from-learn2learn.md"


def test_migration_guide_fastmaml_blocks_run_in_order(tmp_path, monkeypatch) -> None:
    """docs/migrating-from-learn2learn.md: each ```python block, in order, in one namespace (the rest is text)."""
    blocks = re.findall(r"```python\n(.*?)```", MIGRATION.read_text(), flags=re.S)
    assert len(blocks) == 4, "the migration guide lost one of its fastmaml examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"migrating-from-learn2learn.md block {number}", "exec"), namespace)  # noqa: S102
    assert namespace["out"].loss.isfinite() and namespace["result"]["step"] == 100
    assert (tmp_path / "runs" / "from_l2l" / "best.pt").exists()
    # 100 meta-iterations on prototype-plus-noise tasks: adaptation must beat chance (0.2) clearly
    assert (namespace["predictions"] == namespace["qy"]).float().mean().item() > 0.5
