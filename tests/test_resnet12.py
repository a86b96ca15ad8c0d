"""ResNet-12: its size, its meta-gradients (float64, against finite differences) and every execution path."""

from __future__ import annotations

import pytest
import torch

import fastmaml
from fastmaml.config import load_config
from fastmaml.episode import Episode
from fastmaml.experiment import build_model

WIDTHS = (2, 3, 3, 4)  # reduced, so a central difference of every parameter stays cheap


def episode(tasks: int = 2, ways: int = 3, size: int = 16) -> Episode:
    g = torch.Generator().manual_seed(3)
    sx = torch.randn(tasks, ways, 3, size, size, generator=g, dtype=torch.float64)
    qx = torch.randn(tasks, 2 * ways, 3, size, size, generator=g, dtype=torch.float64)
    qy = torch.arange(ways).repeat_interleave(2).repeat(tasks, 1)
    return Episode(sx, torch.arange(ways).repeat(tasks, 1), qx, qy)


def learner(first_order: bool = False, **execution) -> fastmaml.MAML:
    torch.manual_seed(0)
    model = fastmaml.ResNet12(3, in_channels=3, widths=WIDTHS).double()
    with torch.no_grad():  # non-trivial BatchNorm affine weights, so their gradients are tested too
        for name, p in model.named_parameters():
            if ".bn" in name or "shortcut.1" in name:
                p.add_(0.3 * torch.randn_like(p))
    return fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, first_order=first_order, loss="cross_entropy",
                         **execution)


def meta_gradient(maml: fastmaml.MAML, ep: Episode) -> torch.Tensor:
    maml.zero_grad(set_to_none=True)
    maml.meta_loss(ep).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in maml.parameters()])


def test_standard_widths_give_metaoptnets_size_and_any_image_size_works() -> None:
    def block(c: int, w: int) -> int:  # three 3x3 convs, a 1x1 shortcut, four BatchNorms (scale and shift)
        return 9 * c * w + 2 * 9 * w * w + c * w + 4 * 2 * w

    expected = block(3, 64) + block(64, 160) + block(160, 320) + block(320, 640) + 640 * 5 + 5
    model = fastmaml.ResNet12(5)
    assert sum(p.numel() for p in model.parameters()) == expected == 12_427_525
    assert model(torch.randn(2, 3, 84, 84)).shape == (2, 5) and model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    config = load_config("miniimagenet_5way1shot", ["model.name=resnet12", "model.filters=64"])
    assert sum(p.numel() for p in build_model(config).parameters()) == expected


def test_second_order_meta_gradient_matches_central_finite_differences_float64() -> None:
    """Four coordinates of every parameter tensor (convs, BatchNorms, shortcuts, head), 2 inner steps."""
    maml, ep, h = learner(), episode(tasks=1, ways=2), 1e-6
    analytic = meta_gradient(maml, ep)
    pick = torch.Generator().manual_seed(0)
    numeric, checked, offset = [], [], 0
    with torch.no_grad():
        for p in maml.parameters():
            flat = p.view(-1)
            for i in torch.randperm(flat.numel(), generator=pick)[:4].tolist():
                flat[i] += h
                plus = maml.meta_loss(ep).loss.item()
                flat[i] -= 2 * h
                minus = maml.meta_loss(ep).loss.item()
                flat[i] += h
                numeric.append((plus - minus) / (2 * h))
                checked.append(offset + i)
            offset += flat.numel()
    numeric_t, analytic_t = torch.tensor(numeric, dtype=torch.float64), analytic[checked]
    err = ((analytic_t - numeric_t).abs().max() / numeric_t.abs().max()).item()
    assert err < 1e-6, f"ResNet-12 second-order meta-gradient vs finite differences: rel err {err:.2e}"
    first_order = meta_gradient(learner(first_order=True), ep)[checked]
    assert ((first_order - numeric_t).abs().max() / numeric_t.abs().max()).item() > 1e-3  # the check has power


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("execution", [{"strategy": "loop"}, {"strategy": "auto"},
                                       {"strategy": "vmap", "chunk_size": 1}, {"strategy": "loop", "checkpoint": True}],
                         ids=["loop", "auto", "vmap-chunks", "loop-recompute"])
def test_every_execution_path_gives_the_vmap_meta_gradient(execution: dict, first_order: bool) -> None:
    ep = episode()
    reference = meta_gradient(learner(first_order, strategy="vmap"), ep)
    other = meta_gradient(learner(first_order, **execution), ep)
    assert ((other - reference).abs().max() / reference.abs().max()).item() < 1e-10
