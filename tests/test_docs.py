"""Every example in the docs runs: the README's API example and the docstring examples."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import torch

import fastmaml.learners

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs_and_learns() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its API example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    model, x = namespace["model"], namespace["x_new"]
    error = (model(x) - 2 * torch.sin(x)).square().mean().item()
    assert error < 1.0, f"the README's adapted model fits its 10 points badly (MSE {error:.3f})"


def test_docstring_examples() -> None:
    result = doctest.testmod(fastmaml.learners, verbose=False)
    assert result.attempted > 0 and result.failed == 0
