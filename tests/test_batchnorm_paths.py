"""TaskBatchNorm's two paths: torch's fused kernel outside vmap, elementary ops under vmap.

The fused kernel is exact but its vmap batching rules were not (second-order meta-gradients
7e-3 to 3e-2 off in torch 2.13), so the path is chosen by the transform stack. These tests pin
the dispatch and check that both paths compute the same function to every derivative order used
by MAML (float64).
"""

from __future__ import annotations

import pytest
import torch

import fastmaml
from fastmaml import TaskBatchNorm
from fastmaml.context import inside_vmap, outside_transforms


def test_transform_stack_queries_see_every_level():
    seen = []

    def probe(x):
        seen.append((inside_vmap(), outside_transforms()))
        return x.sum()

    probe(torch.ones(2))
    torch.func.grad(probe)(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.vmap(torch.func.grad(probe))(torch.ones(3, 2))
    torch.func.grad(lambda x: torch.func.vmap(probe)(x).sum())(torch.ones(3, 2))
    assert seen == [(False, True), (False, False), (True, False), (True, False), (True, False)]


def _layer(steps: int = 1, scale: bool = True) -> TaskBatchNorm:
    torch.manual_seed(0)
    layer = TaskBatchNorm(3, steps=steps, scale=scale).double()
    with torch.no_grad():
        if scale:
            layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _second_order(apply, layer: TaskBatchNorm, x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of a function of the first derivatives: what MAML's outer backward computes."""
    x = x.clone().requires_grad_(True)
    out = apply(x)
    inputs = [x, *layer.parameters()]
    first = torch.autograd.grad((out.sin() * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                inputs, create_graph=True)
    objective = sum((g * g).sum() for g in first) + out.pow(2).sum()
    return [out.detach(), *torch.autograd.grad(objective, inputs)]


@pytest.mark.parametrize("scale", [True, False], ids=["scale", "offset-only"])
@pytest.mark.parametrize("shape", [(6, 3), (5, 3, 4, 4)], ids=["linear", "conv"])
def test_fused_and_elementary_paths_agree_to_second_order_float64(shape, scale):
    layer = _layer(scale=scale)
    assert (layer.weight is not None) == scale and layer.bias is not None
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    fused = _second_order(layer, layer, x)
    elementary = _second_order(lambda t: torch.func.vmap(layer)(t.unsqueeze(0)).squeeze(0), layer, x)
    for a, b in zip(fused, elementary):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(g.abs().max() > 0 for g in fused[1:])


def test_fused_path_uses_the_current_steps_weights():
    from fastmaml.context import at_step

    layer = _layer(steps=3)
    x = torch.randn(4, 3, dtype=torch.float64)
    for step in range(4):
        with at_step(step):
            fused = layer(x)
            elementary = torch.func.vmap(layer)(x.unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(fused, elementary, rtol=1e-12, atol=1e-12)
        with at_step(min(step, 2)):
            expected = layer(x)
        torch.testing.assert_close(fused, expected)


def test_reduced_precision_input_keeps_float32_statistics():
    layer = TaskBatchNorm(3)
    torch.manual_seed(0)
    x = (torch.randn(64, 3) + 30).bfloat16()  # |mean| >> std: a mean rounded to bf16 is ~0.1 off
    out = layer(x)
    assert out.dtype == torch.float32
    exact = x.double()
    exact = (exact - exact.mean(0)) / torch.sqrt(exact.var(0, correction=0) + layer.eps)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-4)


def test_offset_only_batchnorm_survives_per_step_copies():
    from fastmaml import per_step_batchnorm

    layer = per_step_batchnorm(torch.nn.Sequential(_layer(scale=False)), steps=3)[0]
    assert layer.weight is None and layer.bias.shape == (3, 3)
    torch.testing.assert_close(layer.bias[2], _layer(scale=False).bias)


def test_original_code_batchnorm_is_meta_learned_but_not_adapted():
    """model.bn_scale=false meta.adapt_batchnorm=false: the original TensorFlow code's BatchNorm."""
    from fastmaml.config import load_config
    from fastmaml.experiment import build_learner

    config = load_config("omniglot_5way1shot_mlp", ["model.bn_scale=false", "meta.adapt_batchnorm=false"])
    learner = build_learner(config, torch.device("cpu"))
    bn_names = fastmaml.batchnorm_parameter_names(learner.model)
    assert bn_names and all(name.endswith(".bias") for name in bn_names)  # offsets only, no scales
    assert set(learner.adapted_names) == {n for n, _ in learner.model.named_parameters()} - set(bn_names)
    torch.manual_seed(0)
    x, y = torch.rand(5, 1, 28, 28), torch.arange(5)
    adapted = learner.adapt(x, y)
    before = dict(learner.model.named_parameters())
    changed = {n for n, v in adapted.params.items() if not torch.equal(v, before[n])}
    assert changed == set(learner.adapted_names)
    episode = fastmaml.Episode(x[None], y[None], torch.rand(1, 10, 1, 28, 28), torch.arange(5).repeat(2)[None])
    learner.meta_loss(episode).loss.backward()
    assert all(before[n].grad is not None and before[n].grad.abs().max() > 0 for n in bn_names)
