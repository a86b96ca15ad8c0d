"""Meta-gradients of the pure core against independent oracles.

Oracles used here never call :mod:`fastmaml.core`:

* a hand-written inner loop per task with ``torch.autograd.grad(..., create_graph=True)`` on explicit
  parameter tensors, hand-written forwards (``F.linear``/``F.conv2d``/``F.batch_norm``) and
  hand-written losses;
* central finite differences of the whole meta-loss in float64;
* the analytic first-order meta-gradient (query gradient at the adapted parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import fastmaml
from fastmaml import SGD, Episode, TaskBatchNorm, make_loss

Params = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------
# Independent oracle pieces: hand-written losses, forwards and inner loop
# ---------------------------------------------------------------------------------------------
def ref_mse(prediction: Tensor, target: Tensor) -> Tensor:
    return ((prediction - target) ** 2).sum() / prediction.numel()


def ref_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    return -log_probs.gather(-1, target.unsqueeze(-1)).sum() / target.numel()


REF_LOSSES = {"mse": ref_mse, "cross_entropy": ref_cross_entropy}


def ref_batch_norm(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Current-batch BatchNorm via torch's own kernel (not fastmaml.TaskBatchNorm)."""
    return F.batch_norm(h, None, None, weight, bias, training=True, eps=1e-5)


def forward_tanh_mlp(p: Params, x: Tensor) -> Tensor:
    """nn.Sequential(Linear, Tanh, Linear, Tanh, ..., Linear) by hand."""
    linear_ids = sorted({int(k.split(".")[0]) for k in p})
    h = x
    for i, idx in enumerate(linear_ids):
        h = F.linear(h, p[f"{idx}.weight"], p[f"{idx}.bias"])
        if i < len(linear_ids) - 1:
            h = torch.tanh(h)
    return h


def forward_bn_mlp(p: Params, x: Tensor) -> Tensor:
    """nn.Sequential(Linear, TaskBatchNorm, Tanh, Linear) by hand."""
    h = F.linear(x, p["0.weight"], p["0.bias"])
    h = torch.tanh(ref_batch_norm(h, p["1.weight"], p["1.bias"]))
    return F.linear(h, p["3.weight"], p["3.bias"])


def forward_convnet(p: Params, x: Tensor) -> Tensor:
    """fastmaml.ConvNet(pool=False) by hand: 4 x (conv stride 2, BN, ReLU), spatial mean, linear head."""
    h = x
    for block in range(4):
        conv, bn = 3 * block, 3 * block + 1
        h = F.conv2d(h, p[f"features.{conv}.weight"], p[f"features.{conv}.bias"], stride=2, padding=1)
        h = F.relu(ref_batch_norm(h, p[f"features.{bn}.weight"], p[f"features.{bn}.bias"]))
    return F.linear(h.mean(dim=(2, 3)), p["head.weight"], p["head.bias"])


def reference_meta_gradient(
    forward: Callable[[Params, Tensor], Tensor],
    params: Params,
    episode: Episode,
    loss: str,
    lr: float,
    steps: int,
) -> tuple[Tensor, Params]:
    """Second-order MAML meta-loss and its gradient: plain autograd, one task at a time."""
    loss_fn = REF_LOSSES[loss]
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_() for k in names]
    total = 0.0
    for t in range(episode.num_tasks):
        fast = list(leaves)
        for _ in range(steps):
            point = dict(zip(names, fast, strict=True))
            support_loss = loss_fn(forward(point, episode.support_x[t]), episode.support_y[t])
            grads = torch.autograd.grad(support_loss, fast, create_graph=True)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        total = total + loss_fn(forward(dict(zip(names, fast, strict=True)), episode.query_x[t]), episode.query_y[t])
    meta_loss = total / episode.num_tasks
    grads = torch.autograd.grad(meta_loss, leaves)
    return meta_loss.detach(), dict(zip(names, grads, strict=True))


def reference_first_order_gradient(
    forward: Callable[[Params, Tensor], Tensor],
    params: Params,
    episode: Episode,
    loss: str,
    lr: float,
    steps: int,
) -> Params:
    """Analytic FOMAML meta-gradient: mean over tasks of grad L_query(theta') at theta' (no graph kept)."""
    loss_fn = REF_LOSSES[loss]
    names = list(params)
    total = [torch.zeros_like(params[k]) for k in names]
    for t in range(episode.num_tasks):
        fast = [params[k].detach().clone() for k in names]
        for _ in range(steps):
            fast = [w.requires_grad_() for w in fast]
            point = dict(zip(names, fast, strict=True))
            support_loss = loss_fn(forward(point, episode.support_x[t]), episode.support_y[t])
            grads = torch.autograd.grad(support_loss, fast)
            fast = [(w - lr * g).detach() for w, g in zip(fast, grads, strict=True)]
        fast = [w.requires_grad_() for w in fast]
        query_loss = loss_fn(forward(dict(zip(names, fast, strict=True)), episode.query_x[t]), episode.query_y[t])
        total = [acc + g for acc, g in zip(total, torch.autograd.grad(query_loss, fast), strict=True)]
    return {k: g / episode.num_tasks for k, g in zip(names, total, strict=True)}


# ---------------------------------------------------------------------------------------------
# The system under test: fastmaml.meta_objective driven directly
# ---------------------------------------------------------------------------------------------
def core_meta_gradient(
    model: nn.Module,
    episode: Episode,
    loss: str,
    lr: float,
    steps: int,
    *,
    strategy: str = "vmap",
    first_order: bool = False,
) -> tuple[Tensor, Params]:
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def forward(p: Params, b: Params, x: Tensor) -> Tensor:
        return functional_call(model, (p, b), (x,))

    losses, _ = fastmaml.meta_objective(
        forward, params, buffers, {},
        episode.support_x, episode.support_y, episode.query_x, episode.query_y,
        strategy=strategy, inner_loss_fn=make_loss(loss), outer_loss_fn=make_loss(loss),
        rule=SGD(lr, first_order), steps=steps,
    )
    assert losses.shape == (episode.num_tasks,)
    meta_loss = losses.mean()
    grads = torch.autograd.grad(meta_loss, list(params.values()))
    return meta_loss.detach(), dict(zip(params, grads, strict=True))


def flat(grads: Params) -> Tensor:
    return torch.cat([grads[k].reshape(-1) for k in sorted(grads)])


def rel_err(a: Params, b: Params) -> float:
    """max|a - b| / max|b| over all parameter gradients flattened."""
    assert a.keys() == b.keys()
    fa, fb = flat(a), flat(b)
    return ((fa - fb).abs().max() / fb.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Cases: small models with a hand-written twin and matching data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    forward: Callable[[Params, Tensor], Tensor]
    loss: str
    lr: float
    make_episode: Callable[[torch.Generator], Episode]


def regression_episode(in_features: int, tasks: int = 3, shots: int = 5, queries: int = 6):
    def make(gen: torch.Generator) -> Episode:
        x = 4 * torch.rand(tasks, shots + queries, in_features, generator=gen, dtype=torch.float64) - 2
        amplitude = 0.5 + 2 * torch.rand(tasks, 1, 1, generator=gen, dtype=torch.float64)
        phase = math.pi * torch.rand(tasks, 1, 1, generator=gen, dtype=torch.float64)
        y = amplitude * torch.sin(x.sum(-1, keepdim=True) - phase)
        return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])

    return make


def classification_episode(example_shape: tuple[int, ...], ways: int = 3, tasks: int = 3, shots: int = 2):
    def make(gen: torch.Generator) -> Episode:
        n = ways * shots
        x = torch.randn(tasks, 2 * n, *example_shape, generator=gen, dtype=torch.float64)
        labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, n)
        y = torch.cat([labels, labels], dim=1)
        # Shift each class's inputs so the tasks are learnable and the losses move.
        x = x + y.view(tasks, 2 * n, *([1] * len(example_shape))).to(x.dtype)
        return Episode(x[:, :n], y[:, :n], x[:, n:], y[:, n:])

    return make


def tanh_mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def randomize_batchnorm_affine(model: nn.Module) -> nn.Module:
    """Non-trivial BN weights, so a bug that ignores them cannot hide behind ones and zeros."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TaskBatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


CASES = {
    "mlp-mse": Case(lambda: tanh_mlp(1, 8, 8, 1), forward_tanh_mlp, "mse", 0.05, regression_episode(1)),
    "mlp-ce": Case(lambda: tanh_mlp(4, 8, 3), forward_tanh_mlp, "cross_entropy", 0.3, classification_episode((4,))),
    "bnmlp-mse": Case(
        lambda: randomize_batchnorm_affine(
            nn.Sequential(nn.Linear(2, 6), TaskBatchNorm(6), nn.Tanh(), nn.Linear(6, 1))
        ),
        forward_bn_mlp, "mse", 0.05, regression_episode(2),
    ),
    "convbn-ce": Case(
        lambda: randomize_batchnorm_affine(fastmaml.ConvNet(ways=3, filters=4, image_size=8)),
        forward_convnet, "cross_entropy", 0.3, classification_episode((1, 8, 8)),
    ),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def build_case(name: str, dtype: torch.dtype) -> tuple[Case, nn.Module, Episode]:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().to(dtype)
    episode = case.make_episode(torch.Generator().manual_seed(1)).to("cpu", dtype=dtype)
    return case, model, episode


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_name", list(CASES), ids=list(CASES))
def test_hand_written_forward_matches_model(case_name):
    """The oracle's forward must be the same function as the model, or the other tests mean nothing."""
    case, model, episode = build_case(case_name, torch.float64)
    params = dict(model.named_parameters())
    x = episode.support_x[0]
    torch.testing.assert_close(case.forward(params, x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("steps", [1, 3], ids=lambda s: f"steps={s}")
@pytest.mark.parametrize("case_name", list(CASES), ids=list(CASES))
def test_meta_gradient_vmap_equals_loop_equals_reference(case_name, steps, dtype):
    case, model, episode = build_case(case_name, dtype)
    ref_loss, ref_grad = reference_meta_gradient(
        case.forward, dict(model.named_parameters()), episode, case.loss, case.lr, steps
    )
    vmap_loss, vmap_grad = core_meta_gradient(model, episode, case.loss, case.lr, steps, strategy="vmap")
    loop_loss, loop_grad = core_meta_gradient(model, episode, case.loss, case.lr, steps, strategy="loop")

    for grads in (ref_grad, vmap_grad, loop_grad):
        assert all(g.dtype == dtype for g in grads.values())
        assert flat(grads).abs().max() > 0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(vmap_loss, ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(loop_loss, ref_loss, rtol=tol, atol=0)
    assert rel_err(vmap_grad, ref_grad) < tol
    assert rel_err(loop_grad, ref_grad) < tol
    assert rel_err(vmap_grad, loop_grad) < tol


def test_reference_is_sensitive_to_second_order_terms():
    """Guard for the oracle itself: dropping create_graph must change the reference noticeably."""
    case, model, episode = build_case("convbn-ce", torch.float64)
    params = dict(model.named_parameters())
    second = reference_meta_gradient(case.forward, params, episode, case.loss, case.lr, 3)[1]
    first = reference_first_order_gradient(case.forward, params, episode, case.loss, case.lr, 3)
    assert rel_err(first, second) > 1e-2


def meta_loss_of_flat(model: nn.Module, episode: Episode, loss: str, lr: float, steps: int, first_order: bool,
                      strategy: str = "vmap"):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def unflatten(vector: Tensor) -> Params:
        return {k: chunk.view(s) for k, chunk, s in zip(names, vector.split(sizes), shapes, strict=True)}

    def forward(p: Params, b: Params, x: Tensor) -> Tensor:
        return functional_call(model, (p, b), (x,))

    def meta_loss(vector: Tensor) -> Tensor:
        losses, _ = fastmaml.meta_objective(
            forward, unflatten(vector), {}, {},
            episode.support_x, episode.support_y, episode.query_x, episode.query_y,
            inner_loss_fn=make_loss(loss), outer_loss_fn=make_loss(loss), rule=SGD(lr, first_order), steps=steps,
            strategy=strategy,
        )
        return losses.mean()

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return meta_loss, theta


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_second_order_meta_gradient_matches_central_finite_differences_float64(strategy):
    """Every element of the 1-8-8-1 tanh MLP's meta-gradient vs a central difference of the meta-loss.

    The loop's analytic gradient takes the plain-autograd inner gradient (grad mode, outside any
    transform); its finite differences, under no_grad, take torch.func.grad."""
    torch.manual_seed(0)
    model = tanh_mlp(1, 8, 8, 1).double()
    episode = regression_episode(1, tasks=4)(torch.Generator().manual_seed(2))
    lr, steps, h = 0.1, 2, 1e-5
    meta_loss, theta = meta_loss_of_flat(model, episode, "mse", lr, steps, first_order=False, strategy=strategy)

    theta_var = theta.clone().requires_grad_()
    (analytic,) = torch.autograd.grad(meta_loss(theta_var), theta_var)
    numeric = torch.empty_like(theta)
    with torch.no_grad():
        for i in range(theta.numel()):
            e = torch.zeros_like(theta)
            e[i] = h
            numeric[i] = (meta_loss(theta + e) - meta_loss(theta - e)) / (2 * h)

    err = ((analytic - numeric).abs().max() / numeric.abs().max()).item()
    assert err < 1e-6, f"second-order meta-gradient vs finite differences: rel err {err:.2e}"

    # The check has power: the first-order gradient of the same loss is far from the numeric one.
    fo_loss, _ = meta_loss_of_flat(model, episode, "mse", lr, steps, first_order=True, strategy=strategy)
    theta_var = theta.clone().requires_grad_()
    (first_order,) = torch.autograd.grad(fo_loss(theta_var), theta_var)
    fo_err = ((first_order - numeric).abs().max() / numeric.abs().max()).item()
    assert fo_err > 1e-2, f"first-order gradient unexpectedly close to finite differences ({fo_err:.2e})"


@pytest.mark.parametrize("strategy", ["vmap", "loop"], ids=lambda s: f"strategy={s}")
@pytest.mark.parametrize("steps", [1, 3], ids=lambda s: f"steps={s}")
@pytest.mark.parametrize("case_name", ["mlp-mse", "convbn-ce"], ids=["mlp-mse", "convbn-ce"])
def test_first_order_meta_gradient_is_query_gradient_at_adapted_params(case_name, steps, strategy):
    case, model, episode = build_case(case_name, torch.float64)
    params = dict(model.named_parameters())
    expected = reference_first_order_gradient(case.forward, params, episode, case.loss, case.lr, steps)
    _, first_order = core_meta_gradient(model, episode, case.loss, case.lr, steps, strategy=strategy, first_order=True)
    _, second_order = core_meta_gradient(model, episode, case.loss, case.lr, steps, strategy=strategy)

    assert rel_err(first_order, expected) < 1e-12
    # First order must really drop the second-order term: a clear gap, not a rounding difference.
    gap = rel_err(first_order, second_order)
    assert gap > 0.1, f"first- and second-order meta-gradients differ by only {gap:.2e}"


BN_MODELS = {
    "convnet-maxpool": (
        lambda: fastmaml.ConvNet(ways=3, filters=4, pool=True, image_size=16),
        classification_episode((1, 16, 16)),
    ),
    "bnmlp": (
        lambda: fastmaml.BatchNormMLP(ways=3, in_features=12, hidden=(8, 8)),
        classification_episode((12,)),
    ),
}


@pytest.mark.parametrize("name", list(BN_MODELS), ids=list(BN_MODELS))
def test_task_batchnorm_vmap_equals_loop_second_order_float64(name):
    build, make_episode = BN_MODELS[name]
    torch.manual_seed(0)
    model = randomize_batchnorm_affine(build()).double()
    episode = make_episode(torch.Generator().manual_seed(3))
    vmap_loss, vmap_grad = core_meta_gradient(model, episode, "cross_entropy", 0.3, 3, strategy="vmap")
    loop_loss, loop_grad = core_meta_gradient(model, episode, "cross_entropy", 0.3, 3, strategy="loop")
    torch.testing.assert_close(vmap_loss, loop_loss, rtol=1e-12, atol=0)
    assert flat(loop_grad).abs().max() > 0
    bn_names = set(_bn_param_names(model))
    bn_grads = [g for k, g in loop_grad.items() if k in bn_names]
    assert bn_grads and all(g.abs().max() > 0 for g in bn_grads), "BatchNorm affine weights get no meta-gradient"
    err = rel_err(vmap_grad, loop_grad)
    assert err < 1e-12, f"vmap vs loop with TaskBatchNorm: rel err {err:.2e}"


def _bn_param_names(model: nn.Module):
    for module_name, module in model.named_modules():
        if isinstance(module, TaskBatchNorm):
            for param_name, _ in module.named_parameters():
                yield f"{module_name}.{param_name}"


@pytest.mark.parametrize(
    "batchnorm", [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False)],
    ids=["BatchNorm1d", "BatchNorm2d", "BatchNorm2d-no-running-stats"],
)
def test_maml_refuses_torch_batchnorm_and_names_the_fix(batchnorm):
    conv_like = isinstance(batchnorm, nn.BatchNorm2d)
    model = nn.Sequential(nn.Conv2d(1, 4, 3) if conv_like else nn.Linear(3, 4), batchnorm, nn.ReLU())
    with pytest.raises(ValueError, match=r"convert_batchnorm"):
        fastmaml.MAML(model)
    converted = fastmaml.convert_batchnorm(model)
    fastmaml.MAML(converted)  # the named fix is accepted
    assert isinstance(converted[1], TaskBatchNorm)
    assert isinstance(model[1], type(batchnorm)), "convert_batchnorm must not modify its argument"


def _model_with_torch_batchnorm() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, eps=1e-3, track_running_stats=False),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, eps=1e-3, track_running_stats=False),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def test_convert_batchnorm_matches_torch_batchnorm_forward_in_train_mode():
    original = _model_with_torch_batchnorm().double().train()
    converted = fastmaml.convert_batchnorm(original).double()
    for index in (1, 4):
        bn, task_bn = original[index], converted[index]
        assert isinstance(task_bn, TaskBatchNorm)
        assert task_bn.eps == bn.eps == 1e-3
        torch.testing.assert_close(task_bn.weight, bn.weight, rtol=0, atol=0)
        torch.testing.assert_close(task_bn.bias, bn.bias, rtol=0, atol=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)


def test_convert_batchnorm_keeps_dtype():
    original = _model_with_torch_batchnorm().double()
    converted = fastmaml.convert_batchnorm(original)
    assert {p.dtype for p in converted.parameters()} == {torch.float64}


def test_meta_objective_rejects_unknown_strategy():
    model = tanh_mlp(1, 4, 1)
    episode = regression_episode(1)(torch.Generator().manual_seed(0)).to("cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"unknown strategy 'pmap'"):
        core_meta_gradient(model, episode, "mse", 0.1, 1, strategy="pmap")


def test_loop_meta_training_takes_the_plain_autograd_inner_gradient(monkeypatch):
    """The per-task loop in grad mode must not go through torch.func.grad (the slower path), and
    must still give the vmapped meta-gradient, second and first order."""
    model = tanh_mlp(1, 8, 8, 1).double()
    episode = regression_episode(1, tasks=3)(torch.Generator().manual_seed(4))
    for first_order in (False, True):
        learner = fastmaml.MAML(model, 0.1, 2, first_order, strategy="vmap")
        reference = torch.autograd.grad(learner.meta_loss(episode).loss, list(model.parameters()))

        def refuse(*args, **kwargs):
            raise AssertionError("torch.func.grad called in the per-task loop")

        graphs: list[bool] = []

        def recording_grad(*args, graphs=graphs, plain_grad=torch.autograd.grad, **kwargs):
            graphs.append(kwargs.get("create_graph", False))
            return plain_grad(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(torch.func, "grad", refuse)
            patch.setattr(torch.autograd, "grad", recording_grad)
            loop = fastmaml.MAML(model, 0.1, 2, first_order, strategy="loop")
            loss = loop.meta_loss(episode).loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for a, b in zip(grads, reference):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # 2 inner steps x 3 tasks; first order records no graph of the inner backward pass
        assert graphs == [not first_order] * 6
    with torch.no_grad():  # adaptation and evaluation still work without grad mode (torch.func.grad)
        loop.adapt(episode.support_x[0], episode.support_y[0])
