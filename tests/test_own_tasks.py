"""Your own tasks end to end: folder and table presets through the CLI, Python factories, fastmaml.fit,
fixed episodes (files and Lake et al.'s runs), and a learning test on real Omniglot images in a folder."""

from __future__ import annotations

import json
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omniglot_fixture import make_lake_runs, shared_omniglot_dir
from PIL import Image

import fastmaml
from fastmaml import checkpoint
from fastmaml.cli import main as cli_main
from fastmaml.runs import read_metrics
from fastmaml.tasks.sinusoid import SinusoidTasks

TINY = ["train.iterations=4", "train.meta_batch=2", "train.log_every=2", "train.val_every=2", "train.val_tasks=4",
        "train.checkpoint_every=2", "eval.tasks=6", "eval.steps=2", "eval.batch=3", "--no-progress"]


def _folder(root: Path, classes: int = 32, per_class: int = 4, size: int = 20) -> Path:
    """An ImageFolder tree of grey PNGs whose brightness encodes the class (one class a JPEG)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(10 + 7 * (c % 32), 3, (size, size)), 0, 255).astype(np.uint8)
            suffix = ".jpg" if c == 0 else ".png"
            Image.fromarray(pixels).save(folder / f"img{i}{suffix}")
    return root


def test_folder_preset_trains_evaluates_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "cache"))
    data, run = _folder(tmp_path / "images"), tmp_path / "run"
    args = ["folder_5way1shot", f"task.data_root={data}", "task.image_size=16", "task.channels=1",
            "task.queries=2", "model.filters=8", "meta.inner_steps=1", "eval.shots=[1]", "eval.queries=2"]
    assert cli_main(["train", *args, *TINY, "--run-dir", str(run)]) == 0
    assert cli_main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert len(result["by_shots"]["1"]["accuracy"]["mean"]) == 3
    assert cli_main(["plot", str(run)]) == 0 and (run / "learning_curves.png").exists()


def test_table_preset_trains_and_evaluates(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = ["sensor,x1,x2,site,y"]
    for g in range(30):
        a, b = rng.uniform(0.5, 3), rng.uniform(0, 3)
        for _ in range(25):
            x1, x2 = rng.uniform(-3, 3, 2)
            rows.append(f"s{g},{x1:.4f},{x2:.4f},{g % 3},{a * np.sin(x1 + b) + 0.1 * x2:.4f}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    args = ["table_regression", f"task.path={tmp_path / 't.csv'}", "task.group=sensor", "task.target=y",
            "task.shots=5", "task.queries=5", "eval.shots=[5]", "eval.queries=5"]
    assert cli_main(["train", *args, *TINY, "--run-dir", str(run)]) == 0
    assert cli_main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert "accuracy" not in result["by_shots"]["5"] and len(result["by_shots"]["5"]["loss"]["mean"]) == 3
    assert "query points per task" in (run / "eval.md").read_text()


FACTORIES = textwrap.dedent('''
    import torch
    import fastmaml
    from fastmaml.tasks.sinusoid import SinusoidTasks

    def tasks(config, split, shots, queries, device):
        return SinusoidTasks(shots=shots, queries=queries, device=str(device))

    def model(config):
        return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def not_a_source(config, split, shots, queries, device):
        return [1, 2, 3]

    def not_a_model(config):
        return "a string"
''')


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_factories"
    sys.modules.pop("my_factories", None)


def test_python_task_and_model_factories_run_from_the_cli(tmp_path: Path, factories: str) -> None:
    run = tmp_path / "run"
    args = ["sinusoid", "task.name=python", f"task.factory={factories}:tasks", "task.kind=regression",
            "model.name=python", f"model.factory={factories}:model", "eval.shots=[5]"]
    assert cli_main(["train", *args, *TINY, "--run-dir", str(run)]) == 0
    assert checkpoint.load(run / "last.pt")["learner"]["model.0.weight"].shape == (16, 1)
    assert cli_main(["eval", str(run)]) == 0
    assert cli_main(["train", "--resume", str(run), "train.iterations=6", "--no-progress"]) == 0


@pytest.mark.parametrize(("override", "message"), [
    ("task.factory=no_such_module_xyz:tasks", "cannot import 'no_such_module_xyz'"),
    ("task.factory={m}:missing", "has no 'missing'"),
    ("task.factory={m}", "must look like 'package.module:function'"),
    ("task.factory={m}:not_a_source", "returned a list"),
    ("model.factory={m}:not_a_model", "returned a str"),
], ids=["import", "attribute", "format", "source-type", "model-type"])
def test_factory_failures_are_one_clear_line(tmp_path: Path, factories: str, override: str, message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sinusoid", "task.name=python", f"task.factory={factories}:tasks", "model.name=python",
            f"model.factory={factories}:model", override.format(m=factories)]
    assert cli_main(["train", *args, *TINY, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def _fit(run: Path, iterations: int, resume: bool = False) -> dict:
    torch.manual_seed(0)
    learner = fastmaml.MAML(fastmaml.sinusoid_mlp(hidden=16), inner_lr=0.01)
    return fastmaml.fit(learner, SinusoidTasks(shots=5, queries=5), run, val_source=SinusoidTasks(shots=5, queries=5),
                        iterations=iterations, meta_batch=4, val_every=5, val_tasks=8, checkpoint_every=5,
                        log_every=5, resume=resume, progress=False)


def test_fit_gives_python_users_the_run_directory_and_exact_resume(tmp_path: Path) -> None:
    result = _fit(tmp_path / "full", 20)
    assert result["step"] == 20 and result["best"] is not None
    for name in ("config.yaml", "last.pt", "last.prev.pt", "best.pt", "metrics.jsonl"):
        assert (tmp_path / "full" / name).exists(), name
    _fit(tmp_path / "split", 10)
    _fit(tmp_path / "split", 20, resume=True)  # a fresh learner object, restored from the checkpoint
    full, split = (checkpoint.load(tmp_path / r / "last.pt")["learner"] for r in ("full", "split"))
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert [r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r] == [
        r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r]
    with pytest.raises(FileExistsError, match="--resume"):
        _fit(tmp_path / "full", 20)


def test_fit_checks_its_settings_like_a_config(tmp_path: Path) -> None:
    learner = fastmaml.MAML(fastmaml.sinusoid_mlp(hidden=8), inner_lr=0.01)
    with pytest.raises(fastmaml.config.ConfigError, match="'train.meta_batch' must be an integer >= 1|meta_batch"):
        fastmaml.fit(learner, SinusoidTasks(shots=5, queries=5), tmp_path / "r", meta_batch=0)
    with pytest.raises(ValueError, match="val_source"):
        fastmaml.fit(learner, SinusoidTasks(shots=5, queries=5), tmp_path / "r", val_every=5)
    assert not (tmp_path / "r").exists()


def test_fixed_episodes_score_exactly_the_sampled_test_tasks(tmp_path: Path) -> None:
    run, episodes = tmp_path / "run", tmp_path / "test_tasks.pt"
    assert cli_main(["train", "sinusoid", *TINY, "eval.shots=[5]", "--run-dir", str(run)]) == 0
    assert cli_main(["eval", str(run)]) == 0
    sampled = json.loads((run / "eval.json").read_text())["by_shots"]["5"]["loss"]
    assert cli_main(["episodes", str(run), "--out", str(episodes)]) == 0
    assert cli_main(["eval", str(run), "--episodes", str(episodes), "--name", "fixed"]) == 0
    fixed = json.loads((run / "fixed.json").read_text())
    assert fixed["by_shots"]["5"]["loss"]["mean"] == pytest.approx(sampled["mean"], rel=1e-6)
    assert len(fixed["per_episode"]["loss"]) == 6 and fixed["episodes_sha256"]


def test_lake_runs_evaluate_a_20_way_learner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "cache"))
    data = _folder(tmp_path / "images", classes=128, per_class=2, size=28)
    run = tmp_path / "run"
    args = ["folder_5way1shot", f"task.data_root={data}", "task.image_size=28", "task.channels=1", "task.ways=20",
            "task.queries=1", "model.filters=8", "meta.inner_steps=1", "eval.queries=1"]
    assert cli_main(["train", *args, *TINY, "--run-dir", str(run)]) == 0
    make_lake_runs(tmp_path / "all_runs.zip", runs=2)
    assert zipfile.is_zipfile(tmp_path / "all_runs.zip")
    assert cli_main(["eval", str(run), "--episodes", str(tmp_path / "all_runs.zip"), "--name", "lake"]) == 0
    result = json.loads((run / "lake.json").read_text())
    assert sorted(result["runs"]) == ["run01", "run02"] and len(result["error_rate_percent"]) == 3
    assert "people: 4.5%" in (run / "lake.md").read_text()
    five_way = tmp_path / "five"
    assert cli_main(["train", *args, "task.ways=5", *TINY, "--run-dir", str(five_way)]) == 0
    assert cli_main(["eval", str(five_way), "--episodes", str(tmp_path / "all_runs.zip")]) == 2


REAL = shared_omniglot_dir()


@pytest.mark.skipif(REAL is None, reason="real Omniglot zips not found (set FASTMAML_DATA)")
def test_a_folder_of_real_omniglot_images_meta_learns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 real characters exported from the official zip into ImageFolder layout: 5-way 1-shot well above 20%."""
    monkeypatch.setenv("FASTMAML_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "omniglot_folder"
    with zipfile.ZipFile(REAL / "images_background.zip") as archive:
        characters = sorted({"/".join(n.split("/")[1:3]) for n in archive.namelist() if n.endswith(".png")})[:100]
        for name in archive.namelist():
            key = "/".join(name.split("/")[1:3])
            if name.endswith(".png") and key in characters:
                target = root / key.replace("/", "__") / Path(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    run = tmp_path / "run"
    args = ["folder_5way1shot", f"task.data_root={root}", "task.image_size=28", "task.channels=1",
            "task.rotation=per_task", "task.queries=5", "model.filters=32", "meta.inner_steps=1", "meta.inner_lr=0.4",
            "train.iterations=150", "train.meta_batch=8", "train.val_every=0", "train.checkpoint_every=150",
            "train.log_every=50", "train.threads=2", "eval.tasks=100", "eval.steps=3", "eval.queries=5",
            "eval.batch=50", "--no-progress"]
    assert cli_main(["train", *args, "--run-dir", str(run)]) == 0
    assert cli_main(["eval", str(run), "--checkpoint", "last"]) == 0
    accuracy = json.loads((run / "eval.json").read_text())["by_shots"]["1"]["accuracy"]["mean"]
    assert accuracy[3] > 0.45, accuracy  # chance is 0.20
