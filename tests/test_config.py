"""Config schema: presets load, overrides apply, mistakes name the key."""

from __future__ import annotations

import pytest

from fastmaml.config import PRESET_DIR, ConfigError, load_config

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))  # supervised; configs/rl/ in test_rl_runner


@pytest.mark.parametrize("preset", PRESETS, ids=[f"preset={p}" for p in PRESETS])
def test_every_preset_loads_and_builds_its_learner(preset: str, tmp_path) -> None:
    import torch

    from fastmaml.experiment import build_learner

    config = load_config(preset)
    assert config.name == preset
    if config.task.name == "table":  # the net's input width is the user's CSV's feature count
        (tmp_path / "t.csv").write_text("g,a,b,c,y\n" + "".join(f"{i % 3},{i},1,2,{i}\n" for i in range(9)))
        config.task.path, config.task.group, config.task.target = str(tmp_path / "t.csv"), "g", "y"
    learner = build_learner(config, torch.device("cpu"))  # data sets are checked by their own tests
    assert sum(p.numel() for p in learner.parameters()) > 0
    assert learner.inner_steps == (0 if config.meta.algorithm == "pretrain" else config.meta.inner_steps)
    if config.task.name == "table":
        assert learner.model[0].in_features == 3


def test_sinusoid_preset_is_the_papers_setting() -> None:
    config = load_config("sinusoid")
    assert (config.task.shots, config.meta.inner_lr, config.meta.inner_steps) == (10, 0.01, 1)
    assert (config.train.meta_batch, config.train.outer_lr, config.train.iterations) == (25, 1e-3, 70000)
    assert config.model.hidden == 40 and config.eval.shots == [5, 10, 20] and config.eval.tasks >= 600


def test_overrides_apply_with_types() -> None:
    config = load_config("sinusoid", ["train.iterations=12", "train.outer_lr=1e-4", "meta.first_order=true",
                                      "eval.shots=[5]"])
    assert config.train.iterations == 12
    assert config.train.outer_lr == pytest.approx(1e-4)
    assert config.meta.first_order is True
    assert config.eval.shots == [5]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.iteratons=5", "unknown config key 'train.iteratons'"),
        ("trian.iterations=5", "'trian' is not a section"),
        ("train.iterations=five", "'train.iterations' must be an integer"),
        ("train.iterations=2.5", "'train.iterations' must be an integer"),
        ("meta.first_order=maybe", "'meta.first_order' must be true or false"),
        ("train.outer_lr=fast", "'train.outer_lr' must be a number"),
        ("iterations", "must look like section.key=value"),
    ],
    ids=["typo-key", "typo-section", "str-for-int", "float-for-int", "str-for-bool", "str-for-float", "no-equals"],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("sinusoid", [override])


def test_unknown_key_in_yaml_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  iterations: 3\n  metabatch: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.metabatch'"):
        load_config(str(path))


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="presets: .*sinusoid"):
        load_config("no_such_preset")
