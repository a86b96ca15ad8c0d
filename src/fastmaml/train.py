"""The training loop: meta-batches, validation, atomic checkpoints, exact resume, metrics.

A thin stateful shell over the learner; all randomness flows from seeded generators whose
states are checkpointed, so ``resume`` replays the uninterrupted run bit for bit on the same
device and software.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastmaml import checkpoint, distributed, runtime
from fastmaml.config import Config, ConfigError, TrainConfig, load_config, save_config
from fastmaml.episode import Episode
from fastmaml.experiment import TaskSource, build_learner, build_tasks, is_classification, resolve_device
from fastmaml.learners import MAML
from fastmaml.runlog import RunLog

LAST = "last.pt"
BEST = "best.pt"
CONFIG = "config.yaml"


class TrainingDiverged(RuntimeError):
    """The meta-loss or meta-gradient became NaN or infinite; the last good checkpoint is kept."""


class StopRequest:
    """Set by SIGINT / SIGTERM while training: finish the iteration, checkpoint it, return.

    The first signal asks for a clean stop (no finished iteration is lost, ``--resume`` goes on
    from it); a second one restores the default handlers, so it interrupts at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle the signals from now on (only the main thread may; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.requested = True
        self.uninstall()


def sample_validation(tasks: TaskSource, count: int, batch: int, seed: int, device: torch.device) -> list[Episode]:
    """A fixed set of held-out episodes, the same at every validation and after resume."""
    generator = torch.Generator(device=device).manual_seed(seed)
    episodes = []
    for start in range(0, count, batch):
        episodes.append(tasks.sample(min(batch, count - start), generator))
    return episodes


def validate(learner: MAML, episodes: list[Episode], steps: int | None = None) -> dict[str, float]:
    """Mean query loss (and accuracy) after ``steps`` inner steps (default: the training number)."""
    steps = learner.inner_steps if steps is None else steps
    losses, accuracies = [], []
    for episode in episodes:
        loss, accuracy = learner.evaluate(episode, steps)
        losses.append(loss[:, steps])
        if accuracy is not None:
            accuracies.append(accuracy[:, steps])
    result = {"val_loss": torch.cat(losses).mean().item()}
    if accuracies:
        result["val_accuracy"] = torch.cat(accuracies).mean().item()
    return result


def is_better(metrics: dict[str, float], best: float | None, classification: bool) -> bool:
    if best is None:
        return True
    return metrics["val_accuracy"] > best if classification else metrics["val_loss"] < best


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG}; is it a fastmaml run directory?")
    return load_config(str(path), overrides)


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Meta-train ``config`` into ``run_dir``; with ``resume``, continue from ``run_dir/last.pt``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank trains on its shard of the meta-batch and the
    meta-gradients are averaged (:mod:`fastmaml.distributed`); rank 0 alone writes the run directory.
    """
    run_dir = Path(run_dir)
    cfg = config.train
    ctx = distributed.from_env()
    local_batch = distributed.shard_size(cfg.meta_batch, ctx.world_size)
    device = ctx.device(resolve_device(cfg.device))
    ctx.start(device)
    finished = False
    try:
        result = _train(config, run_dir, resume, progress, ctx, local_batch, device)
        finished = True
        return result
    finally:
        ctx.close(finished)


def _prepare_run_dir(config: Config, run_dir: Path, resume: bool, world_size: int) -> dict[str, Any] | None:
    """Rank 0: refuse to overwrite a run, load the checkpoint to resume from, save the config."""
    state = None
    if resume:
        state = checkpoint.load(run_dir / LAST, map_location="cpu")
        saved = state.get("world_size", 1)
        if saved != world_size:
            raise ValueError(
                f"{run_dir / LAST} was trained by {saved} process(es) but this run has {world_size}: each rank has "
                f"its own task stream, so only the same world size continues it exactly. Resume with {saved} "
                "process(es) (torchrun --nproc_per_node x --nnodes; plain `fastmaml train --resume` for 1), "
                "or start a new run."
            )
    elif (run_dir / LAST).exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG)
    return state


def _train(config: Config, run_dir: Path, resume: bool, progress: bool, ctx: distributed.DistContext,
           local_batch: int, device: torch.device) -> dict[str, Any]:
    cfg = config.train
    if cfg.val_steps < 0:
        raise ConfigError(f"train.val_steps must be >= 0 (0 = meta.inner_steps), got {cfg.val_steps}")
    state = ctx.run_on_main(lambda: _prepare_run_dir(config, run_dir, resume, ctx.world_size))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.reuse_freed_memory and device.type == "cpu":
        runtime.reuse_freed_memory()

    torch.manual_seed(cfg.seed)
    learner = build_learner(config, device)
    ctx.broadcast_module(learner)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.outer_lr)
    scheduler = _lr_schedule(optimizer, cfg)
    task_rng = torch.Generator(device=device).manual_seed(distributed.task_seed(cfg.seed, ctx.rank))
    train_tasks = build_tasks(config, "train", device)
    classification = is_classification(config)
    val_episodes: list[Episode] = []
    if cfg.val_every and ctx.is_main:
        val_tasks = build_tasks(config, "val", device)
        val_episodes = sample_validation(val_tasks, cfg.val_tasks, config.eval.batch, cfg.seed + 2, device)

    step, best, window = 0, None, [0.0, 0.0, 0]
    if state is not None:
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        mine = state["rank_rng"][ctx.rank] if "rank_rng" in state else state
        task_rng.set_state(mine["task_rng"])
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], device)
        step, best, window = state["step"], state["best"], list(state["window"])
        del state

    def rng_states() -> dict[str, torch.Tensor]:
        states = {"task_rng": task_rng.get_state(), "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state(device)
        return states

    def snapshot() -> dict[str, Any] | None:
        """The checkpoint (on rank 0; ``None`` elsewhere); a collective: every rank must call it."""
        ctx.check_replicas(learner, step)
        ranks = ctx.all_gather_object(rng_states())
        if not ctx.is_main:
            return None
        last = {
            "step": step, "learner": learner.state_dict(), "optimizer": optimizer.state_dict(), **ranks[0],
            "best": best, "window": list(window), "config": config.to_dict(), "world_size": ctx.world_size,
        }
        if ctx.enabled:
            last["rank_rng"] = ranks
        if scheduler is not None:
            last["scheduler"] = scheduler.state_dict()
        return last

    log = RunLog(run_dir, resume_step=step if resume else None) if ctx.is_main else None
    bar = tqdm(total=cfg.iterations, initial=step, disable=not (progress and ctx.is_main), dynamic_ncols=True,
               desc=config.name)
    params = [p for p in learner.parameters() if p.requires_grad]
    tick, tick_step = time.perf_counter(), step
    stop = StopRequest()
    stop.install()
    try:
        while step < cfg.iterations:
            learner.begin_iteration(step)  # e.g. MAML++'s annealed multi-step loss and derivative order
            episode = train_tasks.sample(local_batch, task_rng)
            optimizer.zero_grad(set_to_none=True)
            if config.meta.backward_chunk:
                out = learner.backward_in_chunks(episode, config.meta.backward_chunk)
            else:
                out = learner.meta_loss(episode)
                out.loss.backward()
            if ctx.enabled:  # global means: the gradient and loss of the whole meta-batch
                scalars = [out.loss, out.loss.new_tensor(float(stop.requested))]
                if out.accuracy is not None:
                    scalars.append(out.accuracy)
                reduced = ctx.average_gradients([p for p in params if p.grad is not None], scalars)
                loss, accuracy = reduced[0], (reduced[2] if out.accuracy is not None else 0.0)
                stopping = reduced[1] > 0  # any rank asked: all stop after this same iteration
            else:
                loss = out.loss.item()
                accuracy = out.accuracy.item() if out.accuracy is not None else 0.0
                stopping = stop.requested
            grad_norm = _grad_norm(learner, cfg.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"meta-loss {loss} / meta-gradient norm {grad_norm} at iteration {step + 1}: training stopped. "
                    f"The last good checkpoint ({run_dir / LAST}, if any) is kept. Lower train.outer_lr or "
                    "meta.inner_lr, or set train.grad_clip, then resume or restart."
                )
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            window[0] += loss
            window[1] += accuracy
            window[2] += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.iterations:
                now = time.perf_counter()
                rate = (step - tick_step) * cfg.meta_batch / max(now - tick, 1e-9)
                record = {"loss": window[0] / window[2], "tasks_per_s": rate}
                if classification:
                    record["accuracy"] = window[1] / window[2]
                if scheduler is not None:
                    record["outer_lr"] = optimizer.param_groups[0]["lr"]
                if log is not None:
                    log.write(step, **record)
                bar.set_postfix(loss=f"{record['loss']:.4g}", tasks_s=f"{rate:.0f}")
                tick, tick_step, window = now, step, [0.0, 0.0, 0]

            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.iterations):
                if ctx.is_main:  # the other ranks wait for rank 0 in the broadcast of ``best``
                    metrics = validate(learner, val_episodes, cfg.val_steps or None)
                    log.write(step, **metrics)
                    if is_better(metrics, best, classification):
                        best = metrics["val_accuracy"] if classification else metrics["val_loss"]
                        checkpoint.save_atomic({"step": step, "learner": learner.state_dict(), "metrics": metrics},
                                               run_dir / BEST)
                best = ctx.broadcast_object(best)

            if step % cfg.checkpoint_every == 0 or step == cfg.iterations or stopping:
                last = snapshot()
                if last is not None:
                    checkpoint.save_atomic(last, run_dir / LAST)
            if stopping:
                if log is not None:
                    log.write(step, event="stopped", message=f"stopped by a signal after iteration {step}; "
                              f"checkpointed to {run_dir / LAST}: continue with --resume")
                break
    except TrainingDiverged as error:
        if log is not None:
            log.write(step, event="diverged", message=str(error))
        raise
    finally:
        stop.uninstall()
        bar.close()
        if log is not None:
            log.close()
    return {"step": step, "best": best, "run_dir": str(run_dir), "rank": ctx.rank, "world_size": ctx.world_size,
            "stopped": step < cfg.iterations}


def _lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The meta learning-rate schedule: constant (MAML) or cosine-annealed (MAML++)."""
    if cfg.lr_schedule == "constant":
        return None
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iterations, eta_min=cfg.min_outer_lr)
    raise ConfigError(f"unknown train.lr_schedule {cfg.lr_schedule!r}; use constant or cosine")


def _grad_norm(learner: MAML, clip: float) -> float:
    """Total meta-gradient norm (clipped in place when ``clip`` > 0)."""
    params = [p for p in learner.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip).item()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
