"""Compare one MAML meta-training step across implementations: fastmaml vs torch.func, learn2learn, higher.

One step = inner loop on every task's support set + query loss + outer backward + Adam step, on
random data of the paper's shapes. Every implementation wraps the same model class (fastmaml's
``sinusoid_mlp`` / ``ConvNet`` with current-batch ``TaskBatchNorm``) from the same initial weights.

For each case the script

1. checks, in float64, that every implementation gives the same meta-gradient as the reference
   (learn2learn, or its re-implementation when learn2learn cannot be imported) and fails loudly
   if one differs by more than ``--tolerance`` (relative, max-abs);
2. times the implementations interleaved round-robin in one process (warm-up, then the median
   over rounds), so that machine noise hits them alike;
3. measures peak memory: on CPU the rise of the peak RSS over ``--memory-steps`` steps, each
   implementation in a fresh subprocess (``VmHWM`` reset just before the steps; see
   :func:`memory_worker`); on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before.

The markdown table is printed last. Examples::

    python benchmarks/compare.py --quick                        # smoke run: 2 rounds, no warm-up
    python benchmarks/compare.py --threads 1 --json out.json --plot out.png
    OMP_WAIT_POLICY=PASSIVE python benchmarks/compare.py --cases omniglot-5w1s omniglot-5w1s-q15 --threads 2
    python benchmarks/compare.py --device cuda

Baselines (each written as its library's own examples write it: one task at a time, ``backward``
of ``loss / T`` per task, which frees each task's graph before the next):

- ``torch.func loop``: ``functional_call`` + ``torch.func.grad`` per task, no ``vmap``.
- ``learn2learn``: ``l2l.algorithms.MAML(model, lr, first_order)``, ``clone()`` then ``adapt()``.
  If ``import learn2learn`` fails only because torchvision does (learn2learn 0.2.0 imports it at
  package import, but its MAML never uses it), torchvision is replaced by a stub in this process
  and a warning says so. If it still fails, a re-implementation of its ``clone()/adapt()``
  semantics (``learn2learn-style``) takes its place, and the reason is printed.
- ``higher``: ``higher.innerloop_ctx(model, SGD(lr), copy_initial_weights=False)``; first order
  detaches the inner gradients through ``grad_callback``.

``fastmaml vmap`` and ``fastmaml loop`` build the whole meta-batch's graph and call ``backward``
once. ``fastmaml auto`` is the default, ``strategy="auto"``: the plan ``MAML.plan`` picks (on CPU:
vmap for the MLP, vmap in chunks of 8 tasks each backpropagated inside ``meta_loss`` for the Omniglot
conv net, the loop for MiniImagenet). ``fastmaml compile`` is ``MAML(..., compile=True)``, run only on
cases with ``Case.compile`` (sinusoid), after two untimed compiling steps. ``fastmaml cudagraphs`` is
``MAML(..., compile=True, compile_mode="reduce-overhead")``: the compiled meta-step replayed as CUDA
graphs, run only with ``--device cuda`` (skipped on CPU, with the reason printed) and only on cases
with ``Case.cudagraphs`` (sinusoid, Omniglot 5-way 1-shot), after three untimed steps (the first
call compiles, the second records the graphs, later ones replay them); its float64 gradient check
takes the third call's gradient, so it checks a replay. Each case that runs a compiled
implementation starts from a fresh ``torch._dynamo.reset()``, so one case's shapes never make the
next case's graphs dynamic.

With ``--threads`` above 1 on a machine that other jobs share, set ``OMP_WAIT_POLICY=PASSIVE``:
torch's OpenMP threads otherwise spin at every barrier waiting for a descheduled sibling, and a
step was seen to take 10 to 100 times longer than with one thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fastmaml
import fastmaml.runtime
from fastmaml.tasks.sinusoid import SinusoidTasks

# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: the paper's model and task shapes, and how long to time it."""

    name: str
    title: str
    tasks: int
    shots: int
    queries: int
    """Query examples per class (classification) or per task (regression)."""
    steps: int
    lr: float
    first_order: bool
    ways: int | None = None
    """Classes per task; ``None`` for regression."""
    in_channels: int = 1
    filters: int = 64
    pool: bool = False
    image_size: int = 28
    rounds: int = 3
    """Interleaved timing rounds (``--rounds`` overrides)."""
    repeat: int = 1
    """Steps per implementation per round (timed together, one sample)."""
    warmup: int = 0
    """Untimed steps per implementation before timing (``--warmup`` overrides); 0 where one step
    takes seconds and first-call costs are noise."""
    check_tasks: int | None = None
    """Tasks of the meta-batch used by the float64 gradient check (``None``: all)."""
    compile: bool = False
    """Run ``fastmaml compile`` (``MAML(..., compile=True)``) on this case; compiling costs ~30 s on
    2 CPU cores for the MLP, minutes for the conv nets, so only where it was measured."""
    cudagraphs: bool = False
    """Run ``fastmaml cudagraphs`` (``compile=True, compile_mode="reduce-overhead"``) on this case
    (CUDA only): the launch-bound cases where replaying one graph should matter most."""

    @property
    def loss(self) -> str:
        return "mse" if self.ways is None else "cross_entropy"

    def model(self) -> nn.Module:
        if self.ways is None:
            return fastmaml.sinusoid_mlp()
        return fastmaml.ConvNet(self.ways, self.in_channels, self.filters, pool=self.pool, image_size=self.image_size)

    def episode(self, generator: torch.Generator) -> fastmaml.Episode:
        if self.ways is None:
            return SinusoidTasks(shots=self.shots, queries=self.queries).sample(self.tasks, generator)
        shape = (self.in_channels, self.image_size, self.image_size)

        def split(per_class: int) -> tuple[Tensor, Tensor]:
            x = torch.randn(self.tasks, self.ways * per_class, *shape, generator=generator)
            y = torch.arange(self.ways).repeat_interleave(per_class).expand(self.tasks, -1).contiguous()
            return x, y

        return fastmaml.Episode(*split(self.shots), *split(self.queries))


CASES = {
    case.name: case
    for case in [
        Case("sinusoid", "sinusoid: MLP 1-40-40-1, T=25, K=10/10, 1 step, 2nd order",
             tasks=25, shots=10, queries=10, steps=1, lr=0.01, first_order=False, rounds=15, repeat=10, warmup=10,
             compile=True, cudagraphs=True),
        Case("omniglot-5w1s", "Omniglot 5-way 1-shot: ConvNet-64, T=32, 1 query/class, 1 step, 2nd order",
             tasks=32, shots=1, queries=1, steps=1, lr=0.4, first_order=False, ways=5, rounds=7, warmup=1,
             cudagraphs=True),
        Case("omniglot-5w1s-q15", "Omniglot 5-way 1-shot, 15 queries/class: T=32, 1 step, 2nd order",
             tasks=32, shots=1, queries=15, steps=1, lr=0.4, first_order=False, ways=5, check_tasks=8),
        Case("omniglot-20w1s", "Omniglot 20-way 1-shot: ConvNet-64, T=16, 1 query/class, 5 steps, 2nd order",
             tasks=16, shots=1, queries=1, steps=5, lr=0.1, first_order=False, ways=20, check_tasks=4),
        Case("miniimagenet-5w1s", "MiniImagenet 5-way 1-shot: ConvNet-32 (max-pool), T=4, 15 queries/class, "
             "5 steps, 2nd order",
             tasks=4, shots=1, queries=15, steps=5, lr=0.01, first_order=False, ways=5, in_channels=3,
             filters=32, pool=True, image_size=84),
        Case("miniimagenet-5w1s-fo", "MiniImagenet 5-way 1-shot, first order (FOMAML): T=4, 15 queries/class, "
             "5 steps",
             tasks=4, shots=1, queries=15, steps=5, lr=0.01, first_order=True, ways=5, in_channels=3,
             filters=32, pool=True, image_size=84),
    ]
}

# ---------------------------------------------------------------------------------------------
# Optional libraries
# ---------------------------------------------------------------------------------------------


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and its submodules as empty modules whose every attribute is a
    placeholder class that raises when used. learn2learn 0.2.0 imports torchvision at package
    import (for its datasets), but ``l2l.algorithms.MAML`` never touches it."""

    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise ImportError("torchvision is a stub in benchmarks/compare.py; it cannot be used")

    class Module(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return _TorchvisionStub.Unavailable

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _TorchvisionStub.Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _purge(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def import_learn2learn(mode: str) -> tuple[types.ModuleType | None, str]:
    """``(module or None, note)``; ``mode`` is ``auto`` (real, else re-implementation) or ``reimpl``."""
    if mode == "reimpl":
        return None, "re-implemented on request (--learn2learn reimpl)"
    torchvision_error = None
    try:
        import torchvision  # noqa: F401 - learn2learn imports it at package import
    except Exception as error:  # noqa: BLE001 - any import failure means "not usable here"
        torchvision_error = f"{type(error).__name__}: {error}"
        _purge("torchvision")
        sys.meta_path.insert(0, _TorchvisionStub())
    try:
        import learn2learn
    except Exception as error:  # noqa: BLE001
        reason = f"{type(error).__name__}: {error}"
        if torchvision_error:
            reason += f" (with torchvision stubbed, as `import torchvision` fails: {torchvision_error})"
        return None, f"learn2learn not importable here because {reason}"
    if torchvision_error is None:
        return learn2learn, f"learn2learn {learn2learn.__version__}"
    note = (f"learn2learn {learn2learn.__version__} WITH TORCHVISION STUBBED: `import torchvision` fails here "
            f"({torchvision_error}); learn2learn imports it at package import but its MAML does not use it")
    print("!" * 100 + f"\nWARNING: {note}\n" + "!" * 100, file=sys.stderr, flush=True)
    return learn2learn, note


def import_higher() -> tuple[types.ModuleType | None, str]:
    try:
        import higher

        version = getattr(higher, "__version__", None)
        if version is None:
            from importlib.metadata import version as dist_version

            version = dist_version("higher")
        return higher, f"higher {version}"
    except Exception as error:  # noqa: BLE001
        return None, f"higher not importable here because {type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------
# Implementations: each fills ``.grad`` of its parameters with the meta-gradient of one episode
# ---------------------------------------------------------------------------------------------

GradFn = Callable[[fastmaml.Episode], None]


@dataclass
class Impl:
    name: str
    parameters: list[nn.Parameter]
    meta_grad: GradFn
    note: str = ""


def impl_fastmaml(case: Case, model: nn.Module, strategy: str, compile: bool = False,
                  compile_mode: str = "default", name: str | None = None) -> Impl:
    learner = fastmaml.MAML(model, case.lr, case.steps, case.first_order, loss=case.loss, strategy=strategy,
                            compile=compile, compile_mode=compile_mode)

    def meta_grad(episode: fastmaml.Episode) -> None:
        learner.meta_loss(episode).loss.backward()

    name = name or ("fastmaml compile" if compile else f"fastmaml {strategy}")
    return Impl(name, list(learner.parameters()), meta_grad)


def impl_torch_func_loop(case: Case, model: nn.Module) -> Impl:
    loss_fn = fastmaml.make_loss(case.loss)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, (p, buffers), (x,))

    def meta_grad(episode: fastmaml.Episode) -> None:
        tasks = episode.num_tasks
        for t in range(tasks):
            sx, sy = episode.support_x[t], episode.support_y[t]
            support_grad = torch.func.grad(lambda p: loss_fn(forward(p, sx), sy))  # noqa: B023
            fast = params
            for _ in range(case.steps):
                grads = support_grad(fast)
                if case.first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
                fast = {k: w - case.lr * grads[k] for k, w in fast.items()}
            (loss_fn(forward(fast, episode.query_x[t]), episode.query_y[t]) / tasks).backward()

    return Impl("torch.func loop", list(model.parameters()), meta_grad)


def impl_learn2learn(case: Case, model: nn.Module, l2l: types.ModuleType | None, note: str) -> Impl:
    loss_fn = fastmaml.make_loss(case.loss)
    maml = l2l.algorithms.MAML(model, lr=case.lr, first_order=case.first_order) if l2l else L2LStyleMAML(
        model, lr=case.lr, first_order=case.first_order)

    def meta_grad(episode: fastmaml.Episode) -> None:
        tasks = episode.num_tasks
        for t in range(tasks):
            learner = maml.clone()
            for _ in range(case.steps):
                learner.adapt(loss_fn(learner(episode.support_x[t]), episode.support_y[t]))
            (loss_fn(learner(episode.query_x[t]), episode.query_y[t]) / tasks).backward()

    name = "learn2learn" if l2l else "learn2learn-style"
    return Impl(name, list(model.parameters()), meta_grad, note)


def impl_higher(case: Case, model: nn.Module, higher: types.ModuleType, note: str) -> Impl:
    loss_fn = fastmaml.make_loss(case.loss)
    inner_opt = torch.optim.SGD(model.parameters(), lr=case.lr)
    callback = (lambda grads: [g.detach() for g in grads]) if case.first_order else None

    def meta_grad(episode: fastmaml.Episode) -> None:
        tasks = episode.num_tasks
        for t in range(tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(case.steps):
                    diffopt.step(loss_fn(fmodel(episode.support_x[t]), episode.support_y[t]), grad_callback=callback)
                (loss_fn(fmodel(episode.query_x[t]), episode.query_y[t]) / tasks).backward()

    return Impl("higher", list(model.parameters()), meta_grad, note)


class L2LStyleMAML(nn.Module):
    """learn2learn's ``MAML.clone()/adapt()`` semantics, re-implemented for when it cannot be imported.

    As ``learn2learn.utils.clone_module``: ``clone()`` copies the module tree with every parameter
    replaced by a differentiable ``p.clone()``. As ``maml_update``: ``adapt(loss)`` takes
    ``g = autograd.grad(loss, params, create_graph=not first_order)`` and swaps each parameter
    for ``p - lr * g`` inside the cloned modules (in place in the module objects, not in tensors).
    """

    def __init__(self, module: nn.Module, lr: float, first_order: bool = False) -> None:
        super().__init__()
        self.module, self.lr, self.first_order = module, lr, first_order

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def clone(self) -> L2LStyleMAML:
        return L2LStyleMAML(_clone_module(self.module), self.lr, self.first_order)

    def adapt(self, loss: Tensor) -> None:
        second_order = not self.first_order
        slots = [(m, k) for m in self.module.modules() for k, p in m._parameters.items() if p is not None]
        grads = torch.autograd.grad(loss, [m._parameters[k] for m, k in slots],
                                    retain_graph=second_order, create_graph=second_order)
        for (m, k), g in zip(slots, grads):
            m._parameters[k] = m._parameters[k] - self.lr * g


def _clone_module(module: nn.Module) -> nn.Module:
    clone = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: (p.clone() if p is not None else None) for k, p in module._parameters.items()}
    clone._buffers = {k: (b.clone() if b is not None else None) for k, b in module._buffers.items()}
    clone._modules = {k: (_clone_module(m) if m is not None else None) for k, m in module._modules.items()}
    return clone


class Libraries(dict):
    """``{"learn2learn": (module | None, note), "higher": (module | None, note)}``, imported on first use."""

    def __init__(self, learn2learn_mode: str) -> None:
        super().__init__()
        self.learn2learn_mode = learn2learn_mode

    def __missing__(self, key: str):
        if key == "learn2learn":
            self[key] = import_learn2learn(self.learn2learn_mode)
        elif key == "higher":
            self[key] = import_higher()
        else:
            raise KeyError(key)
        return self[key]


IMPL_NAMES = ["fastmaml auto", "fastmaml vmap", "fastmaml loop", "fastmaml compile", "fastmaml cudagraphs",
              "torch.func loop", "learn2learn", "higher"]
COMPILED = ("fastmaml compile", "fastmaml cudagraphs")
"""Implementations that compile on their first call (and, for cudagraphs, record on the second)."""


def build(case: Case, which: str, model: nn.Module, libs: dict) -> Impl:
    if which == "fastmaml auto":
        return impl_fastmaml(case, model, "auto")
    if which == "fastmaml compile":
        return impl_fastmaml(case, model, "auto", compile=True)
    if which == "fastmaml cudagraphs":
        return impl_fastmaml(case, model, "auto", compile=True, compile_mode="reduce-overhead",
                             name="fastmaml cudagraphs")
    if which == "fastmaml vmap":
        return impl_fastmaml(case, model, "vmap")
    if which == "fastmaml loop":
        return impl_fastmaml(case, model, "loop")
    if which == "torch.func loop":
        return impl_torch_func_loop(case, model)
    if which == "learn2learn":
        l2l, note = libs["learn2learn"]
        return impl_learn2learn(case, model, l2l, note)
    if which == "higher":
        higher, note = libs["higher"]
        return impl_higher(case, model, higher, note)
    raise ValueError(f"unknown implementation {which!r}; choose from {IMPL_NAMES}")


def available(libs: dict, wanted: list[str], device: str = "cpu") -> list[str]:
    names = []
    for name in wanted:
        if name == "higher" and libs["higher"][0] is None:
            print(f"SKIP higher: {libs['higher'][1]}", file=sys.stderr)
            continue
        if name == "fastmaml cudagraphs" and not device.startswith("cuda"):
            print(f"SKIP fastmaml cudagraphs: compile_mode='reduce-overhead' replays CUDA graphs, which need "
                  f"--device cuda (this run: {device})", file=sys.stderr)
            continue
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def initial_model(case: Case, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    return case.model().to(device=device, dtype=dtype)


def check_gradients(case: Case, names: list[str], libs: dict, device: str, tolerance: float) -> dict[str, float]:
    """Max relative error (max-abs over all parameters, float64) of each meta-gradient vs the reference."""
    episode = case.episode(torch.Generator().manual_seed(1)).to(device, dtype=torch.float64)
    if case.check_tasks is not None:
        episode = episode.task(slice(0, case.check_tasks))
    base = initial_model(case, torch.float64, device)
    grads: dict[str, list[Tensor]] = {}
    labels: dict[str, str] = {}
    for name in names:
        impl = build(case, name, copy.deepcopy(base), libs)
        labels[name] = impl.name
        for _ in range(3 if name == "fastmaml cudagraphs" else 1):  # compile, record, replay: check the replay
            for p in impl.parameters:
                p.grad = None
            impl.meta_grad(episode)
        grads[name] = [p.grad.detach().clone() for p in impl.parameters]
    reference = _reference(names)
    scale = max(g.abs().max().item() for g in grads[reference])
    errors = {}
    for name in names:
        if len(grads[name]) != len(grads[reference]):
            raise AssertionError(f"{case.name}: {name} has {len(grads[name])} parameter tensors, "
                                 f"{reference} has {len(grads[reference])}")
        diff = max((a - b).abs().max().item() for a, b in zip(grads[name], grads[reference]))
        errors[name] = diff / scale
    print(f"  float64 meta-gradient ({episode.num_tasks} tasks), max |g - g_ref| / max |g_ref| vs {labels[reference]}: "
          + ", ".join(f"{labels[k]} {v:.1e}" for k, v in errors.items()), flush=True)
    bad = {k: v for k, v in errors.items() if not v < tolerance}
    if bad:
        raise AssertionError(f"{case.name}: meta-gradients differ from {reference} beyond {tolerance:g}: {bad}")
    return errors


def _reference(names: list[str]) -> str:
    for candidate in ("learn2learn", "higher", "torch.func loop"):
        if candidate in names:
            return candidate
    return names[0]


def make_step(case: Case, name: str, libs: dict, device: str) -> tuple[Callable[[], None], Impl]:
    impl = build(case, name, initial_model(case, torch.float32, device), libs)
    optimizer = torch.optim.Adam(impl.parameters, lr=1e-3)
    episode = case.episode(torch.Generator().manual_seed(2)).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        impl.meta_grad(episode)
        optimizer.step()

    return step, impl


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(
    case: Case, names: list[str], libs: dict, device: str, rounds: int, warmup: int,
    warmup_s: dict[str, float] | None = None,
) -> dict[str, tuple[list[float], list[float]]]:
    """Per implementation, (wall seconds, process CPU seconds) per step: one sample per round,
    the implementations' order rotating each round. With one thread, CPU time barely counts the
    time this process waits for a core, so it is the steadier figure on a shared machine.
    ``warmup_s``, if given, receives each implementation's wall seconds of warm-up (compiling included)."""
    steps = {name: make_step(case, name, libs, device)[0] for name in names}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        if warmup_s is not None:
            warmup_s[name] = time.perf_counter() - start
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(case.repeat):
                steps[name]()
            _sync(device)
            samples[name][0].append((time.perf_counter() - start) / case.repeat)
            samples[name][1].append((time.process_time() - start_cpu) / case.repeat)
    return samples


def peak_memory_cuda(case: Case, name: str, libs: dict, device: str, steps: int) -> float:
    """MiB by which the allocated peak rises over ``steps`` steps. Compiled implementations first take
    three untimed steps; what they keep allocated from those (CUDA graph memory pools) is counted, the
    transient peaks of compiling and recording are not."""
    step, _ = make_step(case, name, libs, device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    if name in COMPILED:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_memory_cpu(case: Case, name: str, args: argparse.Namespace) -> dict | None:
    """MiB by which the peak RSS of a fresh process rises over ``args.memory_steps`` steps."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", case.name, name,
               "--threads", str(args.threads), "--memory-steps", str(args.memory_steps),
               "--learn2learn", args.learn2learn] + (["--reuse-freed-memory"] if args.reuse_freed_memory else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  memory worker failed for {name}: {result.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _proc_status_kib(*keys: str) -> dict[str, int] | None:
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {k: int(fields[k].split()[0]) for k in keys}
    except (OSError, KeyError, ValueError):
        return None


def memory_worker(args: argparse.Namespace) -> None:
    """Print the rise of this process's peak RSS over a few steps, as JSON (MiB).

    Linux: the peak (``VmHWM``) is reset to the current RSS right before the steps through
    ``/proc/self/clear_refs`` and read after them, so import-time peaks do not hide the steps'.
    Elsewhere: ``ru_maxrss`` after minus before. (``ru_maxrss`` alone is wrong in a subprocess
    on Linux: it keeps the parent's peak across fork and exec, so a child of a big benchmark
    process read "+0".)
    """
    torch.set_num_threads(args.threads)
    case_name, name = args.memory_worker
    libs = Libraries(args.learn2learn)  # imports only what this implementation needs
    step, _ = make_step(CASES[case_name], name, libs, "cpu")
    if name in COMPILED:
        step()  # compile first: the compiler's own memory is not the step's
    gc.collect()
    method = "ru_maxrss"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to VmRSS (Linux >= 4.0)
        status = _proc_status_kib("VmRSS", "VmHWM")
        if status is not None and status["VmHWM"] == status["VmRSS"]:
            method, before = "VmHWM", status["VmRSS"]
    except OSError:
        pass
    for _ in range(args.memory_steps):
        step()
    after = _proc_status_kib("VmHWM")["VmHWM"] if method == "VmHWM" else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"peak_rss_increase_mib": (after - before) / 1024, "peak_rss_mib": after / 1024,
                      "rss_before_steps_mib": before / 1024, "method": method}))


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def machine_info(device: str, threads: int) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device, "threads": threads,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    info["load_average"] = os.getloadavg()
    threading_vars = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
    info["env"] = {k: v for k, v in os.environ.items() if k in threading_vars}
    return info


def markdown_table(results: dict, reference_name: str) -> str:
    """One row per (case, implementation); ratios are medians over the reference's median."""
    lines = [f"| case | implementation | ms/step (wall, median) | wall min-max | vs {reference_name} (wall) "
             f"| CPU ms/step (median) | vs {reference_name} (CPU) | peak memory (MiB) | grad rel. err (fp64) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case_name, case in results["cases"].items():
        ref = case["impls"].get(reference_name, {})
        for name, r in case["impls"].items():
            wall = f"{r['ms_median'] / ref['ms_median']:.2f}x" if ref else "n/a"
            cpu = f"{r['cpu_ms_median'] / ref['cpu_ms_median']:.2f}x" if ref else "n/a"
            memory = "n/a" if r.get("peak_mib") is None else f"+{r['peak_mib']:.1f}"
            err = r.get("grad_rel_err")
            err_text = "n/a" if err is None else f"{err:.0e}"
            lines.append(f"| {case_name} | {name} | {r['ms_median']:.1f} | {r['ms_min']:.1f}-{r['ms_max']:.1f} "
                         f"| {wall} | {r['cpu_ms_median']:.1f} | {cpu} | {memory} | {err_text} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Grouped bars, log ms/step per case, one bar per implementation. On CPU a second panel shows
    process CPU time, which a machine shared with other jobs disturbs far less than wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results["cases"])
    names = []
    for case in results["cases"].values():
        names += [n for n in case["impls"] if n not in names]
    info = results["machine"]
    metrics = [("ms_median", "wall ms per step (median, log)")]
    if not info["device"].startswith("cuda"):
        metrics.append(("cpu_ms_median", "process CPU ms per step (median, log)"))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8, 1.9 * len(cases)), 4.2 * len(metrics)), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], metrics):
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, case in enumerate(cases):
                r = results["cases"][case]["impls"].get(name)
                if r is not None:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(r[key])
            bars = ax.bar(xs, ys, width, label=name)
            ax.bar_label(bars, [f"{y:.0f}" if y >= 10 else f"{y:.1f}" for y in ys], fontsize=6, rotation=90, padding=2)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 3)
        ax.set_xticks(range(len(cases)), cases, rotation=10)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(names), loc="upper left")
    axes[0, 0].set_title(f"MAML meta-training step: {info['device']} ({info['cpu']}), {info['threads']} thread(s), "
                         f"torch {info['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                        help=f"cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--impls", nargs="+", default=IMPL_NAMES, choices=IMPL_NAMES, metavar="IMPL",
                        help="implementations (default all available)")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per case (default: per case)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per implementation before timing (default: per case)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 rounds per case, no warm-up: a smoke run")
    parser.add_argument("--tolerance", type=float, default=1e-8, help="max relative meta-gradient error (float64)")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 gradient check")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-steps", type=int, default=1, help="steps per memory measurement")
    parser.add_argument("--learn2learn", choices=["auto", "reimpl"], default="auto",
                        help="auto: real learn2learn if importable, else the re-implementation")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="keep freed memory in the process (fastmaml.runtime, as `fastmaml train` does on CPU): "
                             "every implementation's steps stop page-faulting their activations in again")
    parser.add_argument("--json", metavar="OUT", help="save all results as JSON")
    parser.add_argument("--plot", metavar="PNG", help="save a bar chart (log ms/step per case)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 2
        args.warmup = 0 if args.warmup is None else args.warmup
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reuse_freed_memory and not fastmaml.runtime.reuse_freed_memory():
        raise SystemExit("--reuse-freed-memory needs Linux with glibc")
    if args.memory_worker:
        memory_worker(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    torch.set_num_threads(args.threads)
    if args.threads > 1 and "OMP_WAIT_POLICY" not in os.environ:
        print("note: --threads > 1 without OMP_WAIT_POLICY=PASSIVE; on a shared machine OpenMP's spinning "
              "can make steps 10-100x slower", file=sys.stderr)
    libs = Libraries(args.learn2learn)
    names = available(libs, args.impls, args.device)
    reference_name = "learn2learn" if libs["learn2learn"][0] is not None else "learn2learn-style"
    results = {"machine": machine_info(args.device, args.threads), "args": vars(args),
               "libraries": {k: v[1] for k, v in libs.items()}, "cases": {}}
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s); "
          f"{libs['learn2learn'][1]}; {libs['higher'][1]}", flush=True)
    started = time.perf_counter()
    for case_name in args.cases:
        case = CASES[case_name]
        print(f"\n== {case.title}", flush=True)
        case_start = time.perf_counter()
        case_names = [n for n in names if (n != "fastmaml compile" or case.compile)
                      and (n != "fastmaml cudagraphs" or case.cudagraphs)]
        compiled = [n for n in case_names if n in COMPILED]
        if compiled:
            torch._dynamo.reset()  # a fresh compiler state per case: no shapes, recompiles or graphs carried over
        errors = {} if args.no_check else check_gradients(case, case_names, libs, args.device, args.tolerance)
        rounds = args.rounds or case.rounds
        warmup = case.warmup if args.warmup is None else args.warmup
        if "fastmaml compile" in case_names:
            warmup = max(warmup, 2)  # the first call compiles
        if "fastmaml cudagraphs" in case_names:
            warmup = max(warmup, 3)  # the first call compiles, the second records the graphs
        if compiled:
            torch._dynamo.reset()
            print(f"  compiling and warming up {', '.join(compiled)} ({warmup} untimed steps each)", flush=True)
        warmup_s: dict[str, float] = {}
        samples = time_case(case, case_names, libs, args.device, rounds, warmup, warmup_s)
        for name in compiled:
            print(f"  {name}: {warmup} warm-up steps (compiling included) took {warmup_s[name]:.1f} s", flush=True)
        impls = {}
        for name in case_names:
            label = reference_name if name == "learn2learn" else name
            ms = [s * 1e3 for s in samples[name][0]]
            cpu_ms = [s * 1e3 for s in samples[name][1]]
            impls[label] = {"ms_median": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms), "ms": ms,
                            "cpu_ms_median": statistics.median(cpu_ms), "cpu_ms": cpu_ms,
                            "grad_rel_err": errors.get(name), "warmup_s": warmup_s.get(name)}
        if not args.no_memory:
            for name in case_names:
                label = reference_name if name == "learn2learn" else name
                if args.device.startswith("cuda"):
                    impls[label]["peak_mib"] = peak_memory_cuda(case, name, libs, args.device, args.memory_steps)
                else:
                    rss = peak_memory_cpu(case, name, args)
                    impls[label]["peak_mib"] = None if rss is None else rss["peak_rss_increase_mib"]
                    impls[label]["rss"] = rss
        results["cases"][case_name] = {"title": case.title, "config": dataclasses.asdict(case), "rounds": rounds,
                                       "warmup": warmup, "impls": impls}
        for label, r in impls.items():
            print(f"  {label:18s} {r['ms_median']:9.1f} ms/step  (min {r['ms_min']:.1f}, max {r['ms_max']:.1f}; "
                  f"CPU {r['cpu_ms_median']:.1f} ms)"
                  + ("" if r.get("peak_mib") is None else f"  peak +{r['peak_mib']:.0f} MiB"), flush=True)
        print(f"  case took {time.perf_counter() - case_start:.0f} s", flush=True)
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
    print(f"\ntotal {results['wall_s']:.0f} s; load average start {results['machine']['load_average']}, "
          f"end {results['machine']['load_average_end']}\n")
    print(markdown_table(results, reference_name))


if __name__ == "__main__":
    main()
