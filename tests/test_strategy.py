"""strategy="auto": the rule it applies, and that every plan it picks gives the loop's meta-gradient.

Also the pieces that make the plans fast: backward chunks inside ``meta_loss``, the parameter
swap that replaces ``functional_call``, and ``compile=True``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import core
from fastmaml.config import load_config
from fastmaml.core import Plan, choose_strategy
from fastmaml.episode import Episode
from fastmaml.experiment import build_learner
from fastmaml.tasks.sinusoid import SinusoidTasks


def tiny_conv(ways: int = 3) -> nn.Module:
    return fastmaml.ConvNet(ways=ways, in_channels=1, filters=4, pool=False, image_size=8)


def conv_episode(tasks: int, ways: int = 3, shots: int = 1, queries: int = 2, size: int = 8,
                 dtype: torch.dtype = torch.float64) -> Episode:
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(tasks, ways * shots, 1, size, size, generator=g, dtype=dtype)
    qx = torch.randn(tasks, ways * queries, 1, size, size, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return Episode(sx, sy, qx, qy)


def meta_grads(learner: fastmaml.MAML, ep: Episode) -> tuple[fastmaml.learners.MetaOutput, dict[str, torch.Tensor]]:
    learner.zero_grad(set_to_none=True)
    out = learner.meta_loss(ep)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in learner.named_parameters()}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    return diff / max(v.abs().max().item() for v in b.values())


# -- the rule -------------------------------------------------------------------------------

# (case of benchmarks/compare.py, device, has_conv, tasks, support + query examples, example numel) -> plan
BENCHMARK_CASES = {
    "sinusoid": (("cpu", False, 25, 20, 1), Plan("vmap")),
    "omniglot-5w1s": (("cpu", True, 32, 10, 28 * 28), Plan("vmap")),
    "omniglot-5w1s-q15": (("cpu", True, 32, 80, 28 * 28), Plan("loop", 1)),
    "omniglot-20w1s": (("cpu", True, 16, 40, 28 * 28), Plan("vmap", 8)),
    "miniimagenet-5w1s": (("cpu", True, 4, 80, 3 * 84 * 84), Plan("loop", 1)),
    "omniglot-5w1s-cuda": (("cuda", True, 32, 80, 28 * 28), Plan("vmap")),
    "miniimagenet-5w1s-cuda": (("cuda", True, 4, 80, 3 * 84 * 84), Plan("vmap")),
}


@pytest.mark.parametrize("case", list(BENCHMARK_CASES))
def test_rule_picks_the_measured_fastest_plan_for_the_benchmark_cases(case: str) -> None:
    (device, has_conv, tasks, examples, numel), expected = BENCHMARK_CASES[case]
    assert choose_strategy(device, has_conv, tasks, examples, numel) == expected


def test_rule_sizes_chunks_by_input_elements_loops_over_large_tasks_and_never_chunks_one_chunk() -> None:
    assert choose_strategy("cpu", True, 16, 40, 784) == Plan("vmap", 8)  # 2**18 // (40 * 784) = 8 tasks
    assert choose_strategy("cpu", True, 8, 40, 784) == Plan("vmap")
    assert choose_strategy("cpu", True, 64, 10, 784) == Plan("vmap", 33)
    assert choose_strategy("cpu", True, 32, 41, 784) == Plan("vmap", 8)  # 32,144 elements per task <= 2**15
    assert choose_strategy("cpu", True, 32, 42, 784) == Plan("loop", 1)  # 32,928 > 2**15: task by task
    assert choose_strategy("cpu", True, 1, 80, 3 * 84 * 84) == Plan("loop")


def test_learner_plan_reads_model_data_shape_and_device() -> None:
    sinusoid = fastmaml.MAML(fastmaml.sinusoid_mlp())
    ep = SinusoidTasks(shots=10, queries=10).sample(25, torch.Generator().manual_seed(0))
    assert sinusoid.plan(ep) == Plan("vmap")
    conv = fastmaml.MAML(fastmaml.ConvNet(5), loss="cross_entropy")
    q15 = Episode(torch.zeros(32, 5, 1, 28, 28), torch.zeros(32, 5, dtype=torch.long),
                  torch.zeros(32, 75, 1, 28, 28), torch.zeros(32, 75, dtype=torch.long))
    assert conv.plan(q15) == Plan("loop", 1)
    mini = fastmaml.MAML(fastmaml.ConvNet(5, 3, 32, pool=True, image_size=84), loss="cross_entropy")
    big = Episode(torch.zeros(4, 5, 3, 84, 84), torch.zeros(4, 5, dtype=torch.long),
                  torch.zeros(4, 75, 3, 84, 84), torch.zeros(4, 75, dtype=torch.long))
    assert mini.plan(big) == Plan("loop", 1)
    for strategy in ("vmap", "loop"):  # an explicit strategy is kept as given
        assert fastmaml.MAML(fastmaml.ConvNet(5), loss="cross_entropy", strategy=strategy).plan(q15) == Plan(strategy)


def test_unknown_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'pmap'"):
        fastmaml.MAML(tiny_conv(), strategy="pmap")
    with pytest.raises(ValueError, match="resolved by the learner"):
        core.meta_objective(lambda p, b, x: x, {}, {}, {}, *[torch.zeros(1, 1)] * 4, strategy="auto")


# -- every plan gives the reference meta-gradient (float64) ------------------------------------


@pytest.mark.parametrize("tasks", [5, 8, 11], ids=lambda t: f"tasks={t}")
@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "anil"])
def test_auto_meta_gradient_equals_the_loop_reference_conv(tasks: int, algorithm: str, monkeypatch) -> None:
    """With chunks of at most 4 tasks of these sizes: 11 tasks run as 4 + 4 + 3, 8 as 4 + 4, 5 as 4 + 1."""
    monkeypatch.setattr(core, "AUTO_CHUNK_INPUT_NUMEL", 4 * 9 * 64)  # 9 examples of 8x8 per task
    make = {"maml": fastmaml.MAML, "metasgd": fastmaml.MetaSGD, "anil": fastmaml.ANIL}[algorithm]
    model = tiny_conv().double()
    auto = make(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy")
    loop = make(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy", strategy="loop")
    ep = conv_episode(tasks)
    assert auto.plan(ep) == Plan("vmap", 4)
    out, grads = meta_grads(auto, ep)
    ref_out, reference = meta_grads(loop, ep)
    assert rel_err(grads, reference) < 1e-10
    torch.testing.assert_close(out.loss, ref_out.loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.task_losses, ref_out.task_losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.accuracy, ref_out.accuracy)


def test_auto_meta_gradient_equals_the_loop_reference_when_it_picks_the_loop(monkeypatch) -> None:
    monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)  # these tiny tasks stand in for MiniImagenet's
    model = tiny_conv().double()
    auto = fastmaml.MAML(model, 0.3, 2, loss="cross_entropy")
    loop = fastmaml.MAML(model, 0.3, 2, loss="cross_entropy", strategy="loop")
    ep = conv_episode(3)
    assert auto.plan(ep) == Plan("loop", 1)
    out, grads = meta_grads(auto, ep)
    ref_out, reference = meta_grads(loop, ep)
    assert rel_err(grads, reference) < 1e-10
    torch.testing.assert_close(out.task_losses, ref_out.task_losses, rtol=1e-12, atol=0)


def test_auto_meta_gradient_equals_the_loop_reference_sinusoid() -> None:
    model = fastmaml.sinusoid_mlp().double()
    ep = SinusoidTasks(shots=10, queries=10).sample(25, torch.Generator().manual_seed(0)).to("cpu", torch.float64)
    auto = fastmaml.MAML(model, 0.01, 1)
    loop = fastmaml.MAML(model, 0.01, 1, strategy="loop")
    assert rel_err(meta_grads(auto, ep)[1], meta_grads(loop, ep)[1]) < 1e-10


def test_chunked_meta_loss_behaves_like_a_loss(monkeypatch) -> None:
    monkeypatch.setattr(core, "AUTO_CHUNK_INPUT_NUMEL", 4 * 9 * 64)
    model = tiny_conv().double()
    learner = fastmaml.MAML(model, 0.3, 1, loss="cross_entropy")
    ep = conv_episode(10)
    assert learner.plan(ep).backward_chunk == 4
    _, reference = meta_grads(fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", strategy="loop"), ep)
    learner.zero_grad(set_to_none=True)
    (3.0 * learner.meta_loss(ep).loss).backward()  # scaled like any loss
    assert rel_err({n: p.grad / 3.0 for n, p in learner.named_parameters()}, reference) < 1e-10
    grads = torch.autograd.grad(learner.meta_loss(ep).loss, list(learner.parameters()))
    assert rel_err(dict(zip([n for n, _ in learner.named_parameters()], grads)), reference) < 1e-10
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(learner.meta_loss(ep).loss, list(learner.parameters()), create_graph=True)
    with torch.no_grad():
        out = learner.meta_loss(ep)
    assert not out.loss.requires_grad and out.task_losses.shape == (10,)


# -- the parameter swap that stands in for functional_call -------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_forward_with_other_parameters_matches_functional_call_and_restores_the_model() -> None:
    model = Tied().double()
    learner = fastmaml.MAML(model)
    params, buffers, _ = learner._state()
    assert list(params) == ["a.weight", "a.bias", "b.bias"]
    other = {k: torch.randn_like(v) for k, v in params.items()}
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = torch.func.functional_call(model, (other, buffers), (x,))
    torch.testing.assert_close(learner._forward(other, buffers, x), expected, rtol=0, atol=0)
    assert model.a.weight is params["a.weight"] and model.b.weight is params["a.weight"]  # restored
    model.a = nn.Linear(3, 3).double()  # a module replaced after the learner was built: table rebuilt
    params, buffers, _ = learner._state()
    other = {k: torch.randn_like(v) for k, v in params.items()}
    expected = torch.func.functional_call(model, (other, buffers), (x,))
    torch.testing.assert_close(learner._forward(other, buffers, x), expected, rtol=0, atol=0)


# -- compile -----------------------------------------------------------------------------------


def _compiled_and_eager(backend: str | bool):
    torch.manual_seed(0)
    model = fastmaml.sinusoid_mlp(hidden=8)
    eager = fastmaml.MAML(model, 0.01, 1)
    compiled = fastmaml.MAML(model, 0.01, 1, compile=backend)
    tasks, g = SinusoidTasks(shots=5, queries=5), torch.Generator().manual_seed(0)
    return eager, compiled, [tasks.sample(4, g) for _ in range(2)]


def _check_compiled(backend: str | bool) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled, episodes = _compiled_and_eager(backend)
    for ep in episodes:  # two steps, same shapes, new data
        _, reference = meta_grads(eager, ep)
        _, grads = meta_grads(compiled, ep)
        assert rel_err(grads, reference) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # compiled once, no recompile
    assert sum(counters["graph_break"].values()) == 0


def test_compiled_meta_objective_matches_eager_and_does_not_recompile() -> None:
    """Traced by TorchDynamo and AOTAutograd (backend aot_eager: the joint graph of vmap, inner grad and
    outer backward, without code generation, ~5 s); the inductor run is the slow test below."""
    _check_compiled("aot_eager")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_compiled_meta_objective_with_inductor_matches_eager() -> None:
    _check_compiled(True)


def test_compile_refuses_what_it_cannot_trace() -> None:
    with pytest.raises(ValueError, match="strategy='auto' or 'vmap'"):
        fastmaml.MAML(tiny_conv(), compile=True, strategy="loop")
    with pytest.raises(ValueError, match="per-step TaskBatchNorm"):
        fastmaml.MAMLPlusPlus(tiny_conv(), inner_steps=2, compile=True)


# -- config ------------------------------------------------------------------------------------


def test_config_defaults_to_auto_and_passes_strategy_and_compile() -> None:
    learner = build_learner(load_config("sinusoid"), torch.device("cpu"))
    assert learner.strategy == "auto" and learner.compile_objective is False
    learner = build_learner(load_config("sinusoid", ["meta.strategy=vmap", "meta.compile=true"]), torch.device("cpu"))
    assert learner.strategy == "vmap" and learner.compile_objective is True
    assert build_learner(load_config("omniglot_5way1shot", ["meta.checkpoint=true"]), torch.device("cpu")).strategy \
        == "loop"
    with pytest.raises(ValueError, match="must be one of auto, vmap, loop"):
        build_learner(load_config("sinusoid", ["meta.strategy=pmap"]), torch.device("cpu"))
