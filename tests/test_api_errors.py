"""Edge cases of the Python API fail loudly where they enter, naming the problem and the fix.

Each case was once a silent wrong answer (a broadcast loss), a NaN, or an error from deep inside
torch that named neither the argument nor the fix.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from miniimagenet_fixture import SPLITS, shared_miniimagenet_splits
from omniglot_fixture import make_omniglot_zips, shared_omniglot_dir
from torch import nn

from fastmaml import ANIL, FOMAML, LSLR, MAML, Episode, MAMLPlusPlus, MetaSGD, make_loss
from fastmaml.tasks.miniimagenet import find_miniimagenet
from fastmaml.tasks.omniglot import find_omniglot_zips

T, S, Q = 3, 4, 6  # tasks, support and query examples: all different, so messages say which is which


def mlp() -> nn.Module:
    """1 -> 8 -> 1 regression net with a ``head`` (for ANIL)."""
    return nn.Sequential(OrderedDict(body=nn.Linear(1, 8), act=nn.Tanh(), head=nn.Linear(8, 1)))


def regression(tasks: int = T, shots: int = S, queries: int = Q, flat_targets: bool = False) -> Episode:
    x = torch.rand(tasks, shots + queries, 1)
    y = torch.sin(x)
    if flat_targets:
        y = y.squeeze(-1)  # [T, n]: the mistake, for a model with one output per example
    return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def classification(ways: int = 3, label_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.long) -> Episode:
    x = torch.randn(T, 2 * ways, 5)
    y = torch.arange(ways).repeat(2).expand(T, -1).reshape(T, 2 * ways, *label_shape).to(dtype)
    return Episode(x[:, :ways], y[:, :ways], x[:, ways:], y[:, ways:])


# --- 1. prediction/target shapes of the built-in losses -----------------------------------------

ENTRIES = {
    "meta_loss-vmap": lambda ep: MAML(mlp(), strategy="vmap").meta_loss(ep),
    "meta_loss-loop": lambda ep: MAML(mlp(), strategy="loop").meta_loss(ep),
    "evaluate": lambda ep: MAML(mlp()).evaluate(ep, steps=2),
    "evaluate-0-steps": lambda ep: MAML(mlp()).evaluate(ep, steps=0),
    "adapt": lambda ep: MAML(mlp()).adapt(ep.support_x[0], ep.support_y[0]),
}


@pytest.mark.parametrize("entry", list(ENTRIES), ids=list(ENTRIES))
def test_mse_rejects_targets_that_would_broadcast(entry):
    """[T, n] targets against [T, n, 1] predictions: torch would average a [n, n] error matrix."""
    episode = regression(flat_targets=True)
    n = Q if entry == "evaluate-0-steps" else S  # no inner step: the query loss is the first computed
    message = (rf"mse loss: predictions have shape \[{n}, 1\] but targets \[{n}\].*"
               rf"reshape the targets to \[{n}, 1\] per task, i.e. \[T, {n}, 1\].*y.unsqueeze\(-1\)")
    with pytest.raises(ValueError, match=message):
        ENTRIES[entry](episode)
    ENTRIES[entry](regression())  # the fix: identical shapes


def test_mse_names_an_output_size_mismatch():
    loss = make_loss("mse")
    with pytest.raises(ValueError, match=r"predictions have shape \[4, 2\] but targets \[4, 1\].*model output"):
        loss(torch.zeros(4, 2), torch.zeros(4, 1))


@pytest.mark.parametrize("name", ["mse", "cross_entropy"])
def test_shape_checks_see_one_task_under_vmap(name):
    """The core calls losses under vmap: the check compares per-task shapes, and passes matching ones."""
    loss = make_loss(name)
    if name == "mse":
        good, bad = (torch.rand(T, Q, 1), torch.rand(T, Q, 1)), (torch.rand(T, Q, 1), torch.rand(T, Q))
        pattern = rf"predictions have shape \[{Q}, 1\] but targets \[{Q}\]"
        oracle = torch.stack([F.mse_loss(p, t) for p, t in zip(*good)])
    else:
        labels = torch.randint(0, 5, (T, Q))
        good, bad = (torch.randn(T, Q, 5), labels), (torch.randn(T, Q, 5), labels[..., None])
        pattern = rf"logits have shape \[{Q}, 5\] but targets \[{Q}, 1\]"
        oracle = torch.stack([F.cross_entropy(p, t) for p, t in zip(*good)])
    torch.testing.assert_close(torch.func.vmap(loss)(*good), oracle)
    with pytest.raises(ValueError, match=pattern):
        torch.func.vmap(loss)(*bad)


CE_CASES = {
    "targets-[n,1]": (dict(label_shape=(1,)), r"logits have shape \[3, 3\] but targets \[3, 1\].*y.squeeze\(-1\)"),
    "float-targets": (dict(dtype=torch.float32), r"targets must be integer class indices.*torch.float32.*y.long\(\)"),
    "int32-targets": (dict(dtype=torch.int32), r"torch.int32.*y.long\(\)"),
}


@pytest.mark.parametrize("case", list(CE_CASES), ids=list(CE_CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum_over_classes"])
def test_cross_entropy_wants_logits_n_by_c_and_integer_targets_n(case, reduction):
    options, message = CE_CASES[case]
    learner = MAML(nn.Linear(5, 3), loss="cross_entropy", reduction=reduction)
    with pytest.raises(ValueError, match=message):
        learner.meta_loss(classification(**options))
    assert torch.isfinite(learner.meta_loss(classification()).loss)


def test_cross_entropy_rejects_logits_that_are_not_a_matrix():
    loss = make_loss("cross_entropy")
    with pytest.raises(ValueError, match=r"logits must be \[examples, classes\] per task, got shape \[2, 3, 4\]"):
        loss(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_episode_rejects_support_and_query_targets_of_different_shapes():
    x = torch.rand(T, S + Q, 1)
    with pytest.raises(ValueError, match="support and query targets have different example shapes"):
        Episode(x[:, :S], x[:, :S], x[:, S:], x[:, S:, 0])


# --- 2. empty episodes, support sets and query sets ---------------------------------------------

def test_episode_rejects_zero_tasks():
    with pytest.raises(ValueError, match=r"Episode has no tasks \(T = 0\)"):
        regression(tasks=0)
    with pytest.raises(ValueError, match="Episode has no tasks"):
        regression().task(slice(T, T + 2))  # a sub-batch past the end


def test_episode_task_counts_negative_indices_from_the_end():
    episode = regression()
    assert torch.equal(episode.task(-1).query_y, episode.query_y[-1:])
    with pytest.raises(IndexError, match=rf"task {T} is out of range for an Episode of {T} tasks"):
        episode.task(T)


def test_episode_rejects_an_empty_support_set():
    with pytest.raises(ValueError, match=r"empty support set \(0 support examples per task\).*shots >= 1"):
        regression(shots=0)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_scoring_an_empty_query_set_is_an_error_not_nan(strategy):
    episode = regression(queries=0)  # allowed: an episode to adapt from (the sinusoid plots draw these)
    learner = MAML(mlp(), strategy=strategy)
    with pytest.raises(ValueError, match=r"meta_loss needs query examples.*empty query set.*queries >= 1"):
        learner.meta_loss(episode)
    with pytest.raises(ValueError, match=r"evaluate needs query examples.*empty query set"):
        learner.evaluate(episode, steps=1)
    adapted = learner.adapt(episode.support_x[0], episode.support_y[0], steps=1)
    assert adapted(torch.zeros(2, 1)).shape == (2, 1)


def test_adapt_rejects_empty_or_mismatched_examples():
    learner = MAML(mlp())
    with pytest.raises(ValueError, match=r"adapt got an empty support set \(x \[0, 1\]\)"):
        learner.adapt(torch.zeros(0, 1), torch.zeros(0, 1))
    with pytest.raises(ValueError, match=r"got x \[4, 1\] and y \[5, 1\].*support_x\[i\]"):
        learner.adapt(torch.zeros(4, 1), torch.zeros(5, 1))


# --- 3. inner_lr and inner_steps ----------------------------------------------------------------

LEARNERS = {
    "MAML": MAML, "FOMAML": FOMAML, "MetaSGD": MetaSGD, "LSLR": LSLR, "ANIL": ANIL, "MAMLPlusPlus": MAMLPlusPlus,
}
BAD_SETTINGS = {
    "inner_lr='0.1'": ({"inner_lr": "0.1"}, TypeError, r"inner_lr must be a real number.*got str '0.1'"),
    "inner_lr=None": ({"inner_lr": None}, TypeError, r"inner_lr must be a real number.*got NoneType"),
    "inner_lr=True": ({"inner_lr": True}, TypeError, r"inner_lr must be a real number.*got bool"),
    "inner_lr=tensor": ({"inner_lr": torch.tensor(0.1)}, TypeError, r"inner_lr must be a real number.*got Tensor"),
    "inner_lr=nan": ({"inner_lr": math.nan}, ValueError, r"inner_lr must be finite, got nan"),
    "inner_lr=-inf": ({"inner_lr": -math.inf}, ValueError, r"inner_lr must be finite, got -inf"),
    "inner_steps=True": ({"inner_steps": True}, TypeError, r"inner_steps must be an int, got bool True"),
    "inner_steps=1.0": ({"inner_steps": 1.0}, TypeError, r"inner_steps must be an int, got float 1.0"),
    "inner_steps='2'": ({"inner_steps": "2"}, TypeError, r"inner_steps must be an int, got str '2'"),
    "inner_steps=-1": ({"inner_steps": -1}, ValueError, r"inner_steps must be >= 0, got -1"),
}


@pytest.mark.parametrize("setting", list(BAD_SETTINGS), ids=list(BAD_SETTINGS))
@pytest.mark.parametrize("learner", list(LEARNERS), ids=list(LEARNERS))
def test_learners_check_inner_lr_and_inner_steps_when_built(learner, setting):
    kwargs, error, message = BAD_SETTINGS[setting]
    with pytest.raises(error, match=message):
        LEARNERS[learner](mlp(), **kwargs)


@pytest.mark.parametrize("learner", list(LEARNERS), ids=list(LEARNERS))
def test_learners_accept_any_real_step_size_and_integral_steps(learner):
    """numpy scalars and ints are real numbers: accepted, and the step size is the one given."""
    built = LEARNERS[learner](mlp(), inner_lr=np.float32(0.25), inner_steps=np.int64(2))
    assert built.inner_steps == 2
    rates = list(built.rule_params.values())
    if rates:  # learned rates start at the step size given
        assert all(torch.all(r == 0.25) for r in rates)
    else:
        assert built.rule.lr == 0.25
    assert torch.isfinite(built.meta_loss(regression()).loss)
    assert MAML(mlp(), inner_lr=1, inner_steps=0).rule.lr == 1


# --- 4. the tests find the real data through FASTMAML_DATA, as the product does -----------------

@pytest.fixture
def data_env(monkeypatch):
    monkeypatch.delenv("FASTMAML_DATA", raising=False)
    monkeypatch.delenv("FASTMAML_SHARED_DATA", raising=False)
    return monkeypatch


@pytest.mark.parametrize("inside", ["omniglot", "."], ids=["DATA/omniglot", "DATA"])
def test_real_omniglot_is_looked_for_in_fastmaml_data(tmp_path, data_env, inside):
    root = tmp_path / "data"
    make_omniglot_zips(root / inside, drawings=1)
    data_env.setenv("FASTMAML_DATA", str(root))
    assert shared_omniglot_dir() == root / inside
    assert find_omniglot_zips(root)[0].parent == root / inside  # where the loader looks, given FASTMAML_DATA


def test_fastmaml_shared_data_remains_an_alias_that_fastmaml_data_overrides(tmp_path, data_env):
    old, new = tmp_path / "old", tmp_path / "new"
    make_omniglot_zips(old / "omniglot", drawings=1)
    data_env.setenv("FASTMAML_SHARED_DATA", str(old))
    assert shared_omniglot_dir() == old / "omniglot"
    make_omniglot_zips(new, drawings=1)
    data_env.setenv("FASTMAML_DATA", str(new))
    assert shared_omniglot_dir() == new


@pytest.mark.parametrize("inside", ["miniimagenet/splits", "miniimagenet", "splits", "."],
                         ids=["DATA/miniimagenet/splits", "DATA/miniimagenet", "DATA/splits", "DATA"])
@pytest.mark.parametrize("variable", ["FASTMAML_DATA", "FASTMAML_SHARED_DATA"])
def test_real_miniimagenet_splits_are_looked_for_in_fastmaml_data(tmp_path, data_env, inside, variable):
    root = tmp_path / "data"
    folder = root / inside
    folder.mkdir(parents=True)
    for split in SPLITS:
        (folder / f"{split}.csv").write_text(f"filename,label\nn0153282900000005.jpg,n0153282{SPLITS.index(split)}\n")
    data_env.setenv(variable, str(root))
    assert shared_miniimagenet_splits() == folder
    (folder.parent if folder.name == "splits" else folder).joinpath("images").mkdir()
    assert find_miniimagenet(root, "val", layout="csv").path == folder / "val.csv"  # where the loader looks
