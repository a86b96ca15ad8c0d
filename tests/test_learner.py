"""The nn.Module learners (MAML, FOMAML, MetaSGD, LSLR) against hand-written oracles.

The oracles run the model with ``torch.func.functional_call`` only; the inner loops, losses and
finite differences are written here and never call :mod:`fastmaml.core`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import fastmaml
from fastmaml import LSLR, MAML, Episode, MetaSGD, TaskBatchNorm

Params = dict[str, Tensor]
LrFn = Callable[[str, int], "float | Tensor"]


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------
def ref_mse(prediction: Tensor, target: Tensor) -> Tensor:
    return ((prediction - target) ** 2).sum() / prediction.numel()


def ref_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    return -log_probs.gather(-1, target.unsqueeze(-1)).sum() / target.numel()


def run(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    return functional_call(model, params, (x,))


def hand_sgd(
    model: nn.Module,
    params: Params,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    lr: LrFn,
    steps: int,
    *,
    adapted: set[str] | None = None,
    create_graph: bool = False,
) -> list[Params]:
    """Trajectory [theta_0, ..., theta_steps] of gradient descent with rate ``lr(name, step)``."""
    names = [k for k in params if adapted is None or k in adapted]
    point = dict(params)
    trajectory = [point]
    for step in range(steps):
        if not create_graph:
            point = {k: (v.detach().requires_grad_() if k in names else v.detach()) for k, v in point.items()}
        loss = loss_fn(run(model, point, x), y)
        grads = torch.autograd.grad(loss, [point[k] for k in names], create_graph=create_graph)
        point = {**point, **{k: point[k] - lr(k, step) * g for k, g in zip(names, grads, strict=True)}}
        if not create_graph:
            point = {k: v.detach() for k, v in point.items()}
        trajectory.append(point)
    return trajectory


def constant(rate: float) -> LrFn:
    return lambda name, step: rate


def oracle_meta_loss(
    model: nn.Module,
    params: Params,
    episode: Episode,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    lr: LrFn,
    steps: int,
    *,
    step_weights: list[float] | None = None,
    adapted: set[str] | None = None,
) -> Tensor:
    """Differentiable (second-order) MAML meta-loss, one task at a time."""
    weights = step_weights if step_weights is not None else [0.0] * steps + [1.0]
    params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    total = 0.0
    for t in range(episode.num_tasks):
        trajectory = hand_sgd(
            model, params, episode.support_x[t], episode.support_y[t], loss_fn, lr, steps,
            adapted=adapted, create_graph=True,
        )
        for weight, point in zip(weights, trajectory, strict=True):
            if weight:
                total = total + weight * loss_fn(run(model, point, episode.query_x[t]), episode.query_y[t])
    return total / episode.num_tasks


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    """max|a - b| / max|b| over all tensors flattened."""
    fa = torch.cat([t.reshape(-1) for t in a])
    fb = torch.cat([t.reshape(-1) for t in b])
    return ((fa - fb).abs().max() / fb.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Tiny models and data
# ---------------------------------------------------------------------------------------------
def tanh_mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    model = fastmaml.ConvNet(ways=3, filters=4, image_size=8)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TaskBatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.double()


def regression_episode(tasks: int = 3, shots: int = 5, queries: int = 6, seed: int = 1) -> Episode:
    gen = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(tasks, shots + queries, 1, generator=gen, dtype=torch.float64) - 2
    amplitude = 0.5 + 2 * torch.rand(tasks, 1, 1, generator=gen, dtype=torch.float64)
    phase = math.pi * torch.rand(tasks, 1, 1, generator=gen, dtype=torch.float64)
    y = amplitude * torch.sin(x - phase)
    return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def classification_episode(
    example_shape: tuple[int, ...], ways: int = 3, tasks: int = 3, shots: int = 2, seed: int = 1
) -> Episode:
    gen = torch.Generator().manual_seed(seed)
    n = ways * shots
    x = torch.randn(tasks, 2 * n, *example_shape, generator=gen, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, n)
    y = torch.cat([labels, labels], dim=1)
    x = x + y.view(tasks, 2 * n, *([1] * len(example_shape))).to(x.dtype)
    return Episode(x[:, :n], y[:, :n], x[:, n:], y[:, n:])


def regression_mlp() -> nn.Module:
    torch.manual_seed(0)
    return tanh_mlp(1, 8, 8, 1).double()


def params_of(model: nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# nn.Module shell: parameters, rule meta-parameters, state_dict
# ---------------------------------------------------------------------------------------------
LEARNERS = {
    "MAML": lambda model, **kw: MAML(model, inner_lr=0.1, inner_steps=2, **kw),
    "MetaSGD": lambda model, **kw: MetaSGD(model, inner_lr=0.1, inner_steps=2, **kw),
    "LSLR": lambda model, **kw: LSLR(model, inner_lr=0.1, inner_steps=2, **kw),
}


@pytest.mark.parametrize("kind", list(LEARNERS), ids=list(LEARNERS))
def test_parameters_are_model_params_plus_rule_meta_params(kind):
    model = regression_mlp()
    learner = LEARNERS[kind](model)
    assert isinstance(learner, nn.Module)
    model_ids = {id(p) for p in model.parameters()}
    rule_ids = {id(p) for p in learner.rule_params.parameters()}
    assert {id(p) for p in learner.parameters()} == model_ids | rule_ids
    assert not model_ids & rule_ids
    expected_rule_shapes = {
        "MAML": {},
        "MetaSGD": {k: p.shape for k, p in model.named_parameters()},
        "LSLR": {k: torch.Size([2]) for k, _ in model.named_parameters()},
    }[kind]
    rule_shapes = {k.replace("__", "."): p.shape for k, p in learner.rule_params.items()}
    assert rule_shapes == expected_rule_shapes
    for p in learner.rule_params.values():
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, torch.full_like(p, 0.1), rtol=0, atol=0)
    assert all(p.requires_grad for p in learner.parameters())


def test_rule_meta_params_only_for_adapted_names():
    model = regression_mlp()
    learner = MetaSGD(model, inner_lr=0.1, adapted_names=["4.weight", "4.bias"])
    assert set(learner.rule_params.keys()) == {"4__weight", "4__bias"}


@pytest.mark.parametrize("kind", ["MetaSGD", "LSLR"], ids=["MetaSGD", "LSLR"])
def test_meta_gradient_reaches_learned_rates_and_matches_finite_differences(kind):
    torch.manual_seed(0)
    model = tanh_mlp(1, 4, 1).double()
    learner = LEARNERS[kind](model)
    with torch.no_grad():  # distinct rates per element, so a mixed-up index cannot pass
        for p in learner.rule_params.values():
            p.uniform_(0.05, 0.2)
    episode = regression_episode(tasks=3)

    # The learner's meta-loss equals the hand-written loop with the same per-element/per-step rates.
    rates = {k.replace("__", "."): p.detach() for k, p in learner.rule_params.items()}
    lr = (lambda k, s: rates[k]) if kind == "MetaSGD" else (lambda k, s: rates[k][s])
    expected = oracle_meta_loss(model, params_of(model), episode, ref_mse, lr, 2)
    loss = learner.meta_loss(episode).loss
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)

    learner.zero_grad()
    loss.backward()
    analytic = [p.grad.clone() for p in learner.rule_params.values()]
    assert all(g is not None and g.abs().max() > 0 for g in analytic)

    h = 1e-6
    numeric = []
    with torch.no_grad():
        for p in learner.rule_params.values():
            fd = torch.empty_like(p)
            for i in range(p.numel()):
                original = p.view(-1)[i].item()
                p.view(-1)[i] = original + h
                plus = learner.meta_loss(episode).loss
                p.view(-1)[i] = original - h
                minus = learner.meta_loss(episode).loss
                p.view(-1)[i] = original
                fd.view(-1)[i] = (plus - minus) / (2 * h)
            numeric.append(fd)
    err = rel_err(analytic, numeric)
    assert err < 1e-6, f"{kind} learning-rate meta-gradient vs finite differences: rel err {err:.2e}"


@pytest.mark.parametrize("kind", ["MetaSGD", "LSLR"], ids=["MetaSGD", "LSLR"])
def test_state_dict_round_trip_gives_identical_meta_loss(kind):
    episode = regression_episode(tasks=4)
    learner = LEARNERS[kind](regression_mlp())
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        learner.meta_loss(episode).loss.backward()
        optimizer.step()
    assert any((p - 0.1).abs().max() > 0 for p in learner.rule_params.values()), "rates did not train"

    torch.manual_seed(123)
    fresh = LEARNERS[kind](tanh_mlp(1, 8, 8, 1).double())
    assert fresh.meta_loss(episode).loss != learner.meta_loss(episode).loss
    assert any(k.startswith("rule_params.") for k in learner.state_dict())
    fresh.load_state_dict(learner.state_dict())
    assert torch.equal(fresh.meta_loss(episode).loss, learner.meta_loss(episode).loss)


# ---------------------------------------------------------------------------------------------
# adapt() and evaluate() against the hand-written inner loop
# ---------------------------------------------------------------------------------------------
ADAPT_CASES = {
    "mlp-mse": (regression_mlp, lambda: regression_episode(tasks=1), "mse", ref_mse),
    "convbn-ce": (
        small_convnet, lambda: classification_episode((1, 8, 8), tasks=1), "cross_entropy", ref_cross_entropy
    ),
}


@pytest.mark.parametrize("steps", [1, 3], ids=lambda s: f"steps={s}")
@pytest.mark.parametrize("case", list(ADAPT_CASES), ids=list(ADAPT_CASES))
def test_adapt_matches_hand_written_sgd(case, steps):
    build, make_episode, loss, ref_loss = ADAPT_CASES[case]
    model = build()
    before = params_of(model)
    learner = MAML(model, inner_lr=0.2, inner_steps=steps, loss=loss)
    episode = make_episode()
    x, y, x_new = episode.support_x[0], episode.support_y[0], episode.query_x[0]

    adapted = learner.adapt(x, y)
    expected = hand_sgd(model, before, x, y, ref_loss, constant(0.2), steps)[-1]
    prediction = adapted(x_new)
    assert not prediction.requires_grad
    torch.testing.assert_close(prediction, run(model, expected, x_new), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapted.params, expected, rtol=1e-12, atol=1e-12)
    for k, v in model.named_parameters():  # adapt() must not touch the learner's own model
        assert torch.equal(v, before[k])
    assert rel_err(list(expected.values()), list(before.values())) > 1e-3, "inner loop did not move"


def test_adapt_steps_argument_overrides_inner_steps():
    model = regression_mlp()
    learner = MAML(model, inner_lr=0.2, inner_steps=1)
    episode = regression_episode(tasks=1)
    x, y = episode.support_x[0], episode.support_y[0]
    expected = hand_sgd(model, params_of(model), x, y, ref_mse, constant(0.2), 4)[-1]
    torch.testing.assert_close(learner.adapt(x, y, steps=4).params, expected, rtol=1e-12, atol=1e-12)


def test_evaluate_columns_equal_losses_after_hand_written_steps_classifier():
    model = small_convnet()
    learner = MAML(model, inner_lr=0.3, inner_steps=1, loss="cross_entropy")
    episode = classification_episode((1, 8, 8), tasks=3)
    steps = 3
    losses, accuracy = learner.evaluate(episode, steps=steps)
    assert losses.shape == (3, steps + 1) and accuracy.shape == (3, steps + 1)
    assert losses.dtype == torch.float64 and not losses.requires_grad
    for t in range(3):
        trajectory = hand_sgd(
            model, params_of(model), episode.support_x[t], episode.support_y[t], ref_cross_entropy, constant(0.3), steps
        )
        for s, point in enumerate(trajectory):
            logits = run(model, point, episode.query_x[t])
            torch.testing.assert_close(losses[t, s], ref_cross_entropy(logits, episode.query_y[t]), rtol=1e-10, atol=0)
            expected_acc = (logits.argmax(-1) == episode.query_y[t]).double().mean()
            torch.testing.assert_close(accuracy[t, s].double(), expected_acc, rtol=0, atol=1e-6)
    assert not torch.allclose(losses[:, 0], losses[:, -1]), "losses do not change across steps"


def ref_cross_entropy_sum_over_classes(logits: Tensor, y: Tensor) -> Tensor:
    return logits.shape[-1] * ref_cross_entropy(logits, y)


@pytest.mark.parametrize("variant", ["maml", "maml++"])
def test_evaluate_adapts_with_the_training_inner_loss_scale(variant):
    """With ``reduction="sum_over_classes"`` the inner step is N times that of the mean loss;
    evaluation must adapt with the same scale as meta-training (it once used the mean loss, so
    test-time steps were N times too small), and its last column must equal the meta-loss."""
    model = small_convnet()
    if variant == "maml":
        learner = MAML(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy", reduction="sum_over_classes")
    else:
        learner = fastmaml.MAMLPlusPlus(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy",
                                        reduction="sum_over_classes")
        learner.step_weights = None  # final-step loss only, to compare with evaluate's last column
    episode = classification_episode((1, 8, 8), tasks=3)
    losses, _ = learner.evaluate(episode, steps=2)
    torch.testing.assert_close(losses[:, 2], learner.meta_loss(episode).task_losses, rtol=1e-10, atol=0)
    if variant == "maml":
        for t in range(3):
            trajectory = hand_sgd(model, params_of(model), episode.support_x[t], episode.support_y[t],
                                  ref_cross_entropy_sum_over_classes, constant(0.1), 2)
            for s, point in enumerate(trajectory):
                expected = ref_cross_entropy(run(model, point, episode.query_x[t]), episode.query_y[t])
                torch.testing.assert_close(losses[t, s], expected, rtol=1e-10, atol=0)


def test_evaluate_regression_and_lslr_reuses_last_rate_past_training_steps():
    model = regression_mlp()
    learner = LSLR(model, inner_lr=0.1, inner_steps=2)
    with torch.no_grad():
        for p in learner.rule_params.values():
            p.copy_(torch.tensor([0.05, 0.15], dtype=torch.float64))
    episode = regression_episode(tasks=2)
    losses, accuracy = learner.evaluate(episode, steps=4)
    assert accuracy is None
    assert losses.shape == (2, 5)
    lr = lambda k, s: [0.05, 0.15][min(s, 1)]  # noqa: E731
    for t in range(2):
        trajectory = hand_sgd(model, params_of(model), episode.support_x[t], episode.support_y[t], ref_mse, lr, 4)
        expected = torch.stack([ref_mse(run(model, p, episode.query_x[t]), episode.query_y[t]) for p in trajectory])
        torch.testing.assert_close(losses[t], expected, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------------------------
# Options: step_weights, first order, ANIL, reduction, chunk_size
# ---------------------------------------------------------------------------------------------
def test_step_weights_loss_and_gradient_equal_weighted_sum_of_query_losses():
    model = regression_mlp()
    weights = [0.1, 0.3, 0.6]
    learner = MAML(model, inner_lr=0.1, inner_steps=2, step_weights=weights)
    episode = regression_episode(tasks=3)
    out = learner.meta_loss(episode)

    leaves = {k: v.clone().requires_grad_() for k, v in params_of(model).items()}
    expected = oracle_meta_loss(model, leaves, episode, ref_mse, constant(0.1), 2, step_weights=weights)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    final_only = oracle_meta_loss(model, leaves, episode, ref_mse, constant(0.1), 2)
    assert abs(out.loss.item() - final_only.item()) > 1e-3 * final_only.item(), "weights had no effect"

    got = torch.autograd.grad(out.loss, list(model.parameters()))
    want = torch.autograd.grad(expected, list(leaves.values()))
    assert rel_err(list(got), list(want)) < 1e-12


def test_step_weights_of_wrong_length_are_rejected():
    learner = MAML(regression_mlp(), inner_steps=2, step_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"step_weights has 2 entries but 2 inner steps need 3"):
        learner.meta_loss(regression_episode())


def test_fomaml_and_derivative_order_switch_match_oracles():
    model = regression_mlp()
    episode = regression_episode(tasks=3)
    learner = fastmaml.FOMAML(model, inner_lr=0.2, inner_steps=2)

    first = torch.autograd.grad(learner.meta_loss(episode).loss, list(model.parameters()))
    expected_first = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(3):
        x, y = episode.support_x[t], episode.support_y[t]
        adapted = hand_sgd(model, params_of(model), x, y, ref_mse, constant(0.2), 2)[-1]
        adapted = {k: v.requires_grad_() for k, v in adapted.items()}
        query = ref_mse(run(model, adapted, episode.query_x[t]), episode.query_y[t])
        grads = torch.autograd.grad(query, list(adapted.values()))
        expected_first = [a + g / 3 for a, g in zip(expected_first, grads, strict=True)]
    assert rel_err(list(first), expected_first) < 1e-12

    learner.with_first_order(False)
    second = torch.autograd.grad(learner.meta_loss(episode).loss, list(model.parameters()))
    leaves = {k: v.clone().requires_grad_() for k, v in params_of(model).items()}
    oracle = oracle_meta_loss(model, leaves, episode, ref_mse, constant(0.2), 2)
    assert rel_err(list(second), list(torch.autograd.grad(oracle, list(leaves.values())))) < 1e-12
    assert rel_err(list(first), list(second)) > 0.1


def test_anil_keeps_body_fixed_in_adapt_and_meta_learns_it():
    model = small_convnet()
    head = {"head.weight", "head.bias"}
    learner = MAML(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy", adapted_names=sorted(head))
    episode = classification_episode((1, 8, 8), tasks=3)
    before = params_of(model)

    adapted = learner.adapt(episode.support_x[0], episode.support_y[0])
    for k, v in adapted.params.items():
        if k in head:
            assert (v - before[k]).abs().max() > 1e-4, f"head parameter {k} was not adapted"
        else:
            assert torch.equal(v, before[k]), f"body parameter {k} changed in adapt()"
    expected = hand_sgd(
        model, before, episode.support_x[0], episode.support_y[0], ref_cross_entropy, constant(0.3), 2, adapted=head
    )[-1]
    torch.testing.assert_close(adapted.params, expected, rtol=1e-12, atol=1e-12)

    body = [k for k, _ in model.named_parameters() if k not in head]
    names = [k for k, _ in model.named_parameters()]
    grads = torch.autograd.grad(learner.meta_loss(episode).loss, list(model.parameters()))
    got = dict(zip(names, grads, strict=True))
    assert all(got[k].abs().max() > 0 for k in body), "body parameters get no meta-gradient"
    leaves = {k: v.clone().requires_grad_() for k, v in before.items()}
    oracle = oracle_meta_loss(model, leaves, episode, ref_cross_entropy, constant(0.3), 2, adapted=head)
    want = dict(zip(leaves, torch.autograd.grad(oracle, list(leaves.values())), strict=True))
    assert rel_err([got[k] for k in leaves], [want[k] for k in leaves]) < 1e-12


def test_anil_rejects_unknown_adapted_name():
    learner = MAML(regression_mlp(), adapted_names=["head.weight"])
    with pytest.raises(KeyError, match=r"head\.weight"):
        learner.meta_loss(regression_episode())


def test_sum_over_classes_is_n_times_mean_and_equals_scaled_inner_lr():
    ways = 3
    logits = torch.randn(6, ways, dtype=torch.float64)
    target = torch.arange(ways).repeat(2)
    summed = fastmaml.make_loss("cross_entropy", "sum_over_classes")(logits, target)
    torch.testing.assert_close(summed, ways * ref_cross_entropy(logits, target), rtol=1e-14, atol=0)
    regression = fastmaml.make_loss("mse", "sum_over_classes")
    torch.testing.assert_close(regression(logits, logits.flip(0)), ref_mse(logits, logits.flip(0)), rtol=1e-14, atol=0)

    model = small_convnet()
    episode = classification_episode((1, 8, 8), ways=ways, tasks=2)
    original = MAML(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy", reduction="sum_over_classes")
    pytorch = MAML(model, inner_lr=0.1 * ways, inner_steps=2, loss="cross_entropy", reduction="mean")
    a = original.adapt(episode.support_x[0], episode.support_y[0]).params
    b = pytorch.adapt(episode.support_x[0], episode.support_y[0]).params
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(original.meta_loss(episode).loss, pytorch.meta_loss(episode).loss, rtol=1e-12, atol=0)
    # ...and differs from the same inner_lr with the mean loss, so the check has power.
    unscaled = MAML(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy").adapt(
        episode.support_x[0], episode.support_y[0]
    ).params
    assert (unscaled["head.weight"] - a["head.weight"]).abs().max() > 1e-4


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValueError, match=r"unknown reduction 'sum'"):
        MAML(regression_mlp(), reduction="sum")


def test_chunked_vmap_equals_unchunked():
    model = small_convnet()
    episode = classification_episode((1, 8, 8), tasks=5)
    whole = MAML(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy")
    chunked = MAML(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy", chunk_size=2)

    out_whole, out_chunked = whole.meta_loss(episode), chunked.meta_loss(episode)
    torch.testing.assert_close(out_chunked.task_losses, out_whole.task_losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(out_chunked.accuracy, out_whole.accuracy, rtol=0, atol=0)
    g_whole = torch.autograd.grad(out_whole.loss, list(model.parameters()))
    g_chunked = torch.autograd.grad(out_chunked.loss, list(model.parameters()))
    assert rel_err(list(g_chunked), list(g_whole)) < 1e-12

    eval_whole, eval_chunked = whole.evaluate(episode, steps=2), chunked.evaluate(episode, steps=2)
    torch.testing.assert_close(eval_chunked[0], eval_whole[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(eval_chunked[1], eval_whole[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Input validation: where data enters, with messages that name the problem
# ---------------------------------------------------------------------------------------------
def _episode_tensors():
    return {
        "support_x": torch.zeros(2, 5, 1),
        "support_y": torch.zeros(2, 5, 1),
        "query_x": torch.zeros(2, 7, 1),
        "query_y": torch.zeros(2, 7, 1),
    }


BAD_EPISODES = {
    "tasks=2-vs-3": ({"query_y": torch.zeros(3, 7, 1)}, ValueError, r"disagree on the number of tasks"),
    "support-examples=5-vs-4": ({"support_y": torch.zeros(2, 4, 1)}, ValueError, r"support_x and support_y disagree"),
    "query-examples=7-vs-6": ({"query_x": torch.zeros(2, 6, 1)}, ValueError, r"query_x and query_y disagree"),
    "example-shape=(1,)-vs-(2,)": ({"query_x": torch.zeros(2, 7, 2)}, ValueError, r"different example shapes"),
    "no-example-dim": ({"support_y": torch.zeros(2)}, ValueError, r"support_y needs a task and an example dimension"),
    "not-a-tensor": ({"query_y": [[0.0]]}, TypeError, r"query_y must be a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_EPISODES), ids=list(BAD_EPISODES))
def test_episode_rejects_malformed_batches(name):
    override, error, message = BAD_EPISODES[name]
    with pytest.raises(error, match=message):
        Episode(**{**_episode_tensors(), **override})


def test_episode_accepts_well_formed_batch():
    episode = Episode(**_episode_tensors())
    assert episode.num_tasks == 2
    assert episode.to("cpu", dtype=torch.float64).support_x.dtype == torch.float64


def test_meta_loss_and_evaluate_reject_dtype_mismatch():
    learner = MAML(tanh_mlp(1, 4, 1))  # float32 model
    episode = regression_episode()  # float64 data
    with pytest.raises(ValueError, match=r"float64 but the model is torch.float32.*episode.to\(dtype="):
        learner.meta_loss(episode)
    with pytest.raises(ValueError, match=r"episode.to\(dtype="):
        learner.evaluate(episode, steps=1)
    learner.meta_loss(episode.to("cpu", dtype=torch.float32))  # the named fix works


def test_meta_loss_rejects_device_mismatch():
    learner = MAML(tanh_mlp(1, 4, 1))
    episode = Episode(*(torch.empty(2, 3, 1, device="meta") for _ in range(4)))
    with pytest.raises(ValueError, match=r"inputs are on meta but the model is on cpu"):
        learner.meta_loss(episode)
