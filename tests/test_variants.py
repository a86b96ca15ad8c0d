"""Variants over the one core: gradient checkpointing, ANIL, MAML++ (per-step BN, annealing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml.context import at_step
from fastmaml.episode import Episode
from fastmaml.rules import SGD, PerLayerPerStepLR


def tiny_conv(ways: int = 3) -> nn.Module:
    return fastmaml.ConvNet(ways=ways, in_channels=1, filters=4, pool=False, image_size=8)


def episode(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 3, dtype=torch.float64) -> Episode:
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(tasks, ways * shots, 1, 8, 8, generator=g, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, 1, 8, 8, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return Episode(sx, sy, qx, qy)


def meta_grads(learner: fastmaml.MAML, ep: Episode) -> dict[str, torch.Tensor]:
    learner.zero_grad(set_to_none=True)
    learner.meta_loss(ep).loss.backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters()}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    return diff / max(v.abs().max().item() for v in b.values())


@pytest.mark.parametrize("rule", ["sgd", "lslr", "sgd-first-order"], ids=lambda r: f"rule={r}")
def test_checkpointed_inner_steps_give_the_same_meta_gradient(rule: str) -> None:
    torch.manual_seed(0)
    model = tiny_conv().double()
    make = {"sgd": lambda: SGD(0.3), "lslr": lambda: PerLayerPerStepLR(0.3, 3),
            "sgd-first-order": lambda: SGD(0.3, first_order=True)}[rule]
    plain = fastmaml.MAML(model, inner_steps=3, loss="cross_entropy", rule=make(), strategy="loop")
    ckpt = fastmaml.MAML(model, inner_steps=3, loss="cross_entropy", rule=make(), strategy="loop", checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    ep = episode()
    reference, checkpointed = meta_grads(plain, ep), meta_grads(ckpt, ep)
    assert set(reference) == set(checkpointed)
    assert rel_err(checkpointed, reference) < 1e-12
    if rule == "lslr":
        assert all(checkpointed[k].abs().sum() > 0 for k in checkpointed if k.startswith("rule_params"))


def test_checkpointing_keeps_memory_flat_in_the_number_of_steps() -> None:
    """Peak RSS of a second-order meta-iteration (fresh subprocess each) at 1 and 6 inner steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from memory_vs_steps import run_isolated

    peak = {(steps, ckpt): run_isolated(steps=steps, checkpoint=ckpt, device="cpu", tasks=1, queries=1, image=56,
                                        filters=32, iterations=2)["peak_mib"]
            for steps in (1, 6) for ckpt in (False, True)}
    plain_growth = peak[6, False] - peak[1, False]
    checkpointed_growth = peak[6, True] - peak[1, True]
    assert plain_growth > 40, peak  # five more steps of activations: ~95 MiB measured
    assert checkpointed_growth < 0.5 * plain_growth, peak  # ~0 on a quiet machine, 23 of 88 MiB on a loaded one


def test_checkpointing_refuses_vmap() -> None:
    with pytest.raises(ValueError, match="strategy='loop'"):
        fastmaml.MAML(tiny_conv(), checkpoint=True)


def test_anil_adapts_only_the_head() -> None:
    torch.manual_seed(0)
    learner = fastmaml.ANIL(tiny_conv().double(), inner_lr=0.5, inner_steps=2, loss="cross_entropy")
    assert learner.adapted_names == ["head.weight", "head.bias"]
    ep = episode()
    adapted = learner.adapt(ep.support_x[0], ep.support_y[0])
    for name, p in learner.model.named_parameters():
        changed = not torch.equal(adapted.params[name], p)
        assert changed == name.startswith("head."), name
    grads = meta_grads(learner, ep)
    assert grads["model.features.0.weight"].abs().sum() > 0  # the body is meta-learned


def test_anil_names_the_modules_when_the_head_is_missing() -> None:
    with pytest.raises(ValueError, match="no parameters under 'classifier'.*features"):
        fastmaml.ANIL(tiny_conv(), head="classifier")


def test_mamlpp_schedule_anneals_multistep_loss_and_derivative_order() -> None:
    schedule = fastmaml.MAMLPlusPlusSchedule(steps=5, msl_iterations=100, first_order_iterations=50)
    start, middle, end = (schedule.step_weights(i) for i in (0, 50, 100))
    for weights in (start, middle, end, schedule.step_weights(10_000)):
        assert len(weights) == 6 and weights[0] == 0.0 and sum(weights) == pytest.approx(1.0)
    assert start[1:] == pytest.approx([0.2] * 5)
    assert end[1:5] == pytest.approx([0.006] * 4) and end[5] == pytest.approx(1 - 4 * 0.006)
    assert start[1] > middle[1] > end[1] and start[5] < middle[5] < end[5]
    assert schedule.first_order(49) and not schedule.first_order(50)
    assert fastmaml.MAMLPlusPlusSchedule(steps=5).step_weights(0) == [0.0] * 5 + [1.0]


def test_mamlpp_learner_applies_its_schedule_and_per_step_batchnorm() -> None:
    torch.manual_seed(0)
    learner = fastmaml.MAMLPlusPlus(tiny_conv().double(), inner_lr=0.3, inner_steps=3, msl_iterations=10,
                                    first_order_iterations=5, loss="cross_entropy")
    bn = learner.model.features[1]
    assert isinstance(bn, fastmaml.TaskBatchNorm) and bn.weight.shape == (4, 4)  # steps + 1 sets
    assert not any("features.1." in n for n in learner.adapted_names)  # BatchNorm is not adapted
    assert learner.rule.first_order and learner.step_weights[1:] == pytest.approx([1 / 3] * 3)
    learner.begin_iteration(5)
    assert not learner.rule.first_order
    # every BatchNorm weight set is used once (points 0..3) and gets a meta-gradient
    with torch.no_grad():
        bn.weight.copy_(torch.rand_like(bn.weight) + 0.5)
    grads = meta_grads(learner, episode())
    assert (grads["model.features.1.weight"].abs().sum(dim=1) > 0).all()
    assert all(grads[k].abs().sum() > 0 for k in grads if k.startswith("rule_params"))
    learner.strategy = "loop"
    assert rel_err(meta_grads(learner, episode()), grads) < 1e-10  # vmap == per-task loop


def test_per_step_batchnorm_uses_the_weights_of_the_current_step() -> None:
    layer = fastmaml.per_step_batchnorm(nn.Sequential(fastmaml.TaskBatchNorm(2)), steps=3)[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    x = torch.randn(6, 2)
    normalised = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    for step, scale in ((0, 1.0), (1, 2.0), (2, 3.0), (7, 3.0)):
        with at_step(step):
            torch.testing.assert_close(layer(x), scale * normalised)


@pytest.mark.parametrize("strategy", ["vmap", "loop"], ids=lambda s: f"strategy={s}")
@pytest.mark.parametrize("chunk", [1, 2, 5], ids=lambda c: f"chunk={c}")
def test_backward_in_chunks_gives_the_meta_batch_gradient(strategy: str, chunk: int) -> None:
    torch.manual_seed(0)
    learner = fastmaml.MAML(tiny_conv().double(), 0.3, 2, loss="cross_entropy", strategy=strategy)
    ep = episode(tasks=5)
    reference_out = learner.meta_loss(ep)
    reference = meta_grads(learner, ep)
    learner.zero_grad(set_to_none=True)
    out = learner.backward_in_chunks(ep, chunk)
    chunked = {n: p.grad.clone() for n, p in learner.named_parameters()}
    assert rel_err(chunked, reference) < 1e-12
    torch.testing.assert_close(out.loss, reference_out.loss.detach())
    torch.testing.assert_close(out.accuracy, reference_out.accuracy)
    assert out.task_losses.shape == (5,)


@pytest.mark.parametrize("variant", ["MAML", "FOMAML", "MetaSGD", "ANIL", "LSLR", "MAMLPlusPlus"])
def test_adapted_model_predicts_as_the_evaluation_path_after_the_same_steps(variant: str) -> None:
    """adapt(x, y, steps=s)(query) scores what evaluate reports at step s (MAML++'s per-step BatchNorm too)."""
    torch.manual_seed(0)
    learner = getattr(fastmaml, variant)(tiny_conv().double(), inner_lr=0.3, inner_steps=3, loss="cross_entropy")
    if variant == "MAMLPlusPlus":  # distinct per-step BatchNorm weights, so a wrong step changes the logits
        bn = learner.model.features[1]
        with torch.no_grad():
            bn.weight.copy_(torch.rand_like(bn.weight) * 2 + 0.1)
            bn.bias.copy_(torch.randn_like(bn.bias))
    ep = episode(tasks=1)
    losses, _ = learner.evaluate(ep, steps=5)
    for steps in (0, 1, 3, 5):
        model = learner.adapt(ep.support_x[0], ep.support_y[0], steps=steps)
        loss = torch.nn.functional.cross_entropy(model(ep.query_x[0]), ep.query_y[0])
        assert loss.item() == pytest.approx(losses[0, steps].item(), rel=1e-9, abs=1e-12), (variant, steps)
