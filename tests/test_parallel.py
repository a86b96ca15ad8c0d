"""Chunks of a meta-batch on worker threads: same meta-gradient, deterministic, thread counts intact."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import core, parallel
from fastmaml.core import Plan, choose_strategy
from fastmaml.episode import Episode


def tiny_conv(ways: int = 3) -> nn.Module:
    return fastmaml.ConvNet(ways=ways, in_channels=1, filters=4, pool=False, image_size=8)


def conv_episode(tasks: int, ways: int = 3, dtype: torch.dtype = torch.float64) -> Episode:
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(tasks, ways, 1, 8, 8, generator=g, dtype=dtype)
    qx = torch.randn(tasks, 2 * ways, 1, 8, 8, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(2).repeat(tasks, 1)
    return Episode(sx, sy, qx, qy)


def meta_grads(learner: fastmaml.MAML, ep: Episode) -> tuple[fastmaml.MetaOutput, list[torch.Tensor]]:
    learner.zero_grad(set_to_none=True)
    out = learner.meta_loss(ep)
    out.loss.backward()
    return out, [p.grad.clone() for p in learner.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> None:
    scale = max(t.abs().max().item() for t in b)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= rtol * scale


# -- the rule ----------------------------------------------------------------------------------


def test_rule_runs_chunks_on_the_threads_it_is_given() -> None:
    # Omniglot 20-way 1-shot: chunks of 8 on one thread; on two, chunks of 4 (the same input
    # elements in flight), two at a time.
    assert choose_strategy("cpu", True, 16, 40, 784, threads=1) == Plan("vmap", 8)
    assert choose_strategy("cpu", True, 16, 40, 784, threads=2) == Plan("vmap", 4, 2)
    assert choose_strategy("cpu", True, 16, 40, 784, threads=8) == Plan("vmap", 1, 8)
    assert choose_strategy("cpu", True, 3, 40, 784, threads=8) == Plan("vmap")  # fits one chunk of 8
    # task by task (15 queries per class; MiniImagenet): one task per thread
    assert choose_strategy("cpu", True, 32, 80, 784, threads=2) == Plan("loop", 1, 2)
    assert choose_strategy("cpu", True, 4, 200, 784, threads=16) == Plan("loop", 1, 4)  # 20-way 5-shot
    # MiniImagenet (1.7M input elements per task): its operations are big enough for intra-op threads
    assert choose_strategy("cpu", True, 4, 80, 3 * 84 * 84, threads=16) == Plan("loop", 1)
    # one chunk (Omniglot 5-way, paper protocol), one task, no conv, CUDA: no threads
    assert choose_strategy("cpu", True, 32, 10, 784, threads=2) == Plan("vmap")
    assert choose_strategy("cpu", True, 1, 80, 784, threads=2) == Plan("loop")
    assert choose_strategy("cpu", False, 25, 20, 1, threads=2) == Plan("vmap")
    assert choose_strategy("cuda", True, 32, 80, 784, threads=2) == Plan("vmap")


def test_task_threads_sets_the_plans_thread_count(monkeypatch) -> None:
    monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)
    ep = conv_episode(5)
    assert fastmaml.MAML(tiny_conv(), loss="cross_entropy", task_threads=3).plan(ep) == Plan("loop", 1, 3)
    assert fastmaml.MAML(tiny_conv(), loss="cross_entropy", task_threads=1).plan(ep) == Plan("loop", 1)
    assert fastmaml.MAML(tiny_conv(), loss="cross_entropy", strategy="loop", task_threads=3).plan(ep) == Plan("loop")
    with pytest.raises(ValueError, match="task_threads must be >= 1"):
        fastmaml.MAML(tiny_conv(), task_threads=0)


# -- threaded chunks give the reference meta-gradient -------------------------------------------


@pytest.mark.parametrize("plan", ["loop", "vmap"])
@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "fomaml"])
def test_threaded_chunks_equal_the_loop_reference(plan: str, algorithm: str, monkeypatch) -> None:
    """float64: 7 tasks on 2 and 3 threads (shares of unequal size) against the plain loop."""
    if plan == "loop":
        monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)
    else:
        monkeypatch.setattr(core, "AUTO_CHUNK_INPUT_NUMEL", 4 * 9 * 64)  # 4 tasks, or 2 per thread on 2
    make = {"maml": fastmaml.MAML, "metasgd": fastmaml.MetaSGD, "fomaml": fastmaml.FOMAML}[algorithm]
    model = tiny_conv().double()
    ep = conv_episode(7)
    ref_out, reference = meta_grads(make(model, 0.3, 2, loss="cross_entropy", strategy="loop"), ep)
    for threads in (2, 3):
        learner = make(model, 0.3, 2, loss="cross_entropy", task_threads=threads)
        assert learner.plan(ep).threads == threads
        out, grads = meta_grads(learner, ep)
        assert_same(grads, reference, 1e-12)
        torch.testing.assert_close(out.task_losses, ref_out.task_losses, rtol=1e-12, atol=0)
        torch.testing.assert_close(out.accuracy, ref_out.accuracy)


def test_threaded_chunks_are_deterministic_and_close_to_one_thread_in_float32(monkeypatch) -> None:
    monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)
    model = tiny_conv()
    ep = conv_episode(6, dtype=torch.float32)
    threaded = fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", task_threads=2)
    first = meta_grads(threaded, ep)[1]
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(meta_grads(threaded, ep)[1], first))
    assert_same(first, meta_grads(fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", task_threads=1), ep)[1], 1e-5)


class ModeDependent(nn.Module):
    """Scales its output in eval mode: the workers' model copies must follow ``.eval()``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_conv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * (1.0 if self.training else 0.5)


def test_worker_copies_follow_train_and_eval_and_replaced_modules(monkeypatch) -> None:
    monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)
    model = ModeDependent().double()
    ep = conv_episode(4)
    threaded = fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", task_threads=2)
    loop = fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", strategy="loop")
    for mode in (model.eval, model.train):
        mode()
        assert_same(meta_grads(threaded, ep)[1], meta_grads(loop, ep)[1], 1e-12)
    model.net.head = nn.Linear(4, 3).double()  # replaced module: the copies are made again
    assert_same(meta_grads(threaded, ep)[1], meta_grads(loop, ep)[1], 1e-12)


def test_models_with_dropout_run_their_chunks_in_order(monkeypatch) -> None:
    """Random draws from the global generator: threads would draw in scheduling order."""
    monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)
    model = nn.Sequential(tiny_conv(), nn.Dropout(0.5)).double()
    ep = conv_episode(4)
    grads = []
    for threads in (2, 1):
        torch.manual_seed(3)
        grads.append(meta_grads(fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", task_threads=threads), ep)[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


class Locked(nn.Module):
    """Holds a lock, which deepcopy refuses: the workers' model copies cannot be made."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_conv()
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_model_that_cannot_be_copied_runs_its_chunks_in_order(monkeypatch) -> None:
    monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)
    model = Locked().double()
    ep = conv_episode(4)
    threaded = fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", task_threads=2)
    assert threaded.plan(ep).threads == 2
    reference = meta_grads(fastmaml.MAML(model, 0.3, 1, loss="cross_entropy", strategy="loop"), ep)[1]
    for _ in range(2):
        assert_same(meta_grads(threaded, ep)[1], reference, 1e-12)
    assert threaded._replicas == [] and threaded._uncopyable


def test_an_error_in_a_worker_reaches_the_caller(monkeypatch) -> None:
    monkeypatch.setattr(core, "AUTO_LOOP_TASK_NUMEL", 100)
    learner = fastmaml.MAML(tiny_conv().double(), 0.3, 1, loss="cross_entropy", task_threads=2)
    ep = conv_episode(4)
    bad = Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y.clone())
    bad.query_y[3, 0] = 7  # a label past the 3 classes, in the task the second worker runs
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|Target 7"):
        learner.meta_loss(bad)
    meta_grads(learner, ep)  # the workers are still there


# -- the pool ----------------------------------------------------------------------------------


def test_workers_run_one_intra_op_thread_and_leave_the_callers_count_alone() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pool = parallel.chunk_threads(2)
        assert parallel.chunk_threads(2) is pool  # one pool per process and size
        seen = pool.run(lambda worker, share: (worker, share, torch.get_num_threads(),
                                              threading.current_thread().name), ["a", "b"])
        assert [s[:3] for s in seen] == [(0, "a", 1), (1, "b", 1)]
        assert seen[0][3] != seen[1][3]
        assert torch.get_num_threads() == 2
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]  # threads started afterwards get the caller's count, not the workers'
        with pytest.raises(ValueError, match="3 shares for 2 worker threads"):
            pool.run(lambda worker, share: share, [1, 2, 3])
    finally:
        torch.set_num_threads(before)


def test_deal_shares_items_round_robin() -> None:
    assert parallel.deal(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert parallel.deal([0, 1], 4) == [[0], [1]]
    with pytest.raises(ValueError, match="at least 2"):
        parallel.ChunkThreads(1)
