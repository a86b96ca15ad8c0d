"""The training loop: meta-batches, validation, checkpoints, exact resume, metrics.

A thin stateful shell over the learner, in named steps (restore, step, log, validate, checkpoint);
the run directory belongs to :mod:`fastmaml.runs`. All randomness flows from seeded generators
whose states are checkpointed, so ``resume`` replays the uninterrupted run bit for bit on the same
device and software.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fastmaml import distributed, runtime
from fastmaml.config import Config, TrainConfig
from fastmaml.episode import Episode
from fastmaml.evaluate import sample_validation
from fastmaml.experiment import TaskSource, build_learner, build_tasks, is_classification, resolve_device
from fastmaml.learners import MAML
from fastmaml.runs import (
    LAST,
    RunDir,
    RunError,
    RunLog,
    StopRequest,
    TrainingDiverged,
    check_resume_changes,
    diverged,
    load_run_config,  # noqa: F401 - re-exported for callers of the old location
    stopped_message,
)

SCHEDULE_KEYS = ("outer_lr", "min_outer_lr", "iterations")
"""Train keys that shape the learning-rate schedule: a resume that changes one re-derives it."""


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


@dataclass
class Progress:
    """What the loop carries between iterations and checkpoints."""

    step: int = 0
    best: float | None = None
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0])  # loss sum, accuracy sum, count


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Meta-train ``config`` into ``run_dir``; with ``resume``, continue from its last checkpoint.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank trains on its shard of the meta-batch and the
    meta-gradients are averaged (:mod:`fastmaml.distributed`); rank 0 alone writes the run directory.
    Nothing is written until the run can start: a bad config, missing data or a refused resume
    leaves the directory as it was.
    """
    return _run(config, run_dir, resume, progress)


def fit(learner: MAML, train_source: TaskSource, run_dir: str | Path, *, val_source: TaskSource | None = None,
        resume: bool = False, progress: bool = True, name: str = "python", **settings: Any) -> dict[str, Any]:
    """Meta-train your own learner on your own task sources, with everything ``fastmaml train`` gives a run.

    The same run directory (lock, ``config.yaml``, checksummed ``last.pt``/``best.pt``, metrics,
    TensorBoard), validation on ``val_source``, a clean stop on Ctrl-C and exact resume
    (``resume=True`` with the same learner and sources). ``settings`` are ``train`` keys of
    :class:`fastmaml.config.TrainConfig` (``iterations``, ``meta_batch``, ``outer_lr``,
    ``val_every``, ``checkpoint_every``, ``seed``, ...), checked like a config file's.
    The learner must already be on ``settings["device"]`` (default cpu), where the sources sample.

    >>> import torch, fastmaml
    >>> from fastmaml.tasks.sinusoid import SinusoidTasks
    >>> learner = fastmaml.MAML(fastmaml.sinusoid_mlp(), inner_lr=0.01)
    >>> result = fastmaml.fit(learner, SinusoidTasks(shots=5, queries=5), run_dir,  # doctest: +SKIP
    ...                       val_source=SinusoidTasks(shots=5, queries=5), iterations=20, meta_batch=4,
    ...                       val_every=10, val_tasks=20)
    >>> result["step"], sorted(p.name for p in run_dir.iterdir())[:3]  # doctest: +SKIP
    (20, ['.lock', 'best.pt', 'config.yaml'])
    """
    from fastmaml.config import MetaConfig, TaskConfig, build_config

    train_settings = build_config(TrainConfig, {"val_every": 0 if val_source is None else 1000, **settings},
                                  source="fastmaml.fit")
    if train_settings.val_every and val_source is None:
        raise ValueError("fastmaml.fit: val_every > 0 needs val_source (a task source of held-out tasks), or "
                         "val_every=0")
    rule = getattr(learner, "rule", None)
    algorithm = {"MetaSGD": "metasgd", "ANIL": "anil", "MAMLPlusPlus": "mamlpp"}.get(type(learner).__name__, "maml")
    meta = MetaConfig(algorithm=algorithm if learner.inner_steps else "pretrain",
                      inner_lr=float(getattr(rule, "lr", 0.0) or 0.0),
                      inner_steps=learner.inner_steps, first_order=bool(getattr(rule, "first_order", False)))
    kind = "classification" if learner.is_classifier else "regression"
    config = Config(name=name, task=TaskConfig(name="python", kind=kind), meta=meta, train=train_settings)
    return _run(config, run_dir, resume, progress, learner=learner, train_tasks=train_source, val_tasks=val_source)


def _run(config: Config, run_dir: str | Path, resume: bool, progress: bool, **objects: Any) -> dict[str, Any]:
    cfg = config.train
    ctx = distributed.from_env()
    distributed.shard_size(cfg.meta_batch, ctx.world_size)  # a meta-batch that does not split fails before any group
    device = ctx.device(resolve_device(cfg.device))
    ctx.start(device)
    run = RunDir(run_dir)
    finished = False
    try:
        state = ctx.run_on_main(lambda: _open_resume(run, config, ctx.world_size) if resume else _refuse_existing(run))
        trainer = Trainer(config, run, ctx, device, progress, **objects)
        result = trainer.fit(state)
        finished = True
        return result
    finally:
        run.release()
        ctx.close(finished)


def _refuse_existing(run: RunDir) -> None:
    if run.has_checkpoint():
        raise FileExistsError(f"{run.path} already holds a run; pass --resume to continue it, or another --run-dir")


def _open_resume(run: RunDir, config: Config, world_size: int) -> dict[str, Any]:
    """Rank 0: lock the run, load its newest good checkpoint, refuse changes it cannot honour."""
    run.open_resume()
    state = run.load_last()
    saved = state.get("world_size", 1)
    if saved != world_size:
        raise RunError(
            f"{run / LAST} was trained by {saved} process(es) but this run has {world_size}: each rank has "
            f"its own task stream, so only the same world size continues it exactly. Resume with {saved} "
            "process(es) (torchrun --nproc_per_node x --nnodes; plain `fastmaml train --resume` for 1), "
            "or start a new run."
        )
    check_resume_changes(state["config"], config.to_dict())
    return state


class Trainer:
    """One run of the supervised meta-training loop, built from a :class:`Config`."""

    def __init__(self, config: Config, run: RunDir, ctx: distributed.DistContext, device: torch.device,
                 progress: bool = True, *, learner: MAML | None = None, train_tasks: TaskSource | None = None,
                 val_tasks: TaskSource | None = None) -> None:
        cfg = self.cfg = config.train
        self.config, self.run, self.ctx, self.device, self.show_progress = config, run, ctx, device, progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.reuse_freed_memory and device.type == "cpu":
            runtime.reuse_freed_memory()
        torch.manual_seed(cfg.seed)
        self.learner = build_learner(config, device) if learner is None else learner
        ctx.broadcast_module(self.learner)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=cfg.outer_lr)
        self.scheduler = _lr_schedule(self.optimizer, cfg)
        self.task_rng = torch.Generator(device=device).manual_seed(distributed.task_seed(cfg.seed, ctx.rank))
        self.train_tasks = build_tasks(config, "train", device) if train_tasks is None else train_tasks
        self.local_batch = distributed.shard_size(cfg.meta_batch, ctx.world_size)
        self.classification = is_classification(config)
        self.val_episodes: list[Episode] = []
        if cfg.val_every and ctx.is_main:
            source = build_tasks(config, "val", device) if val_tasks is None else val_tasks
            self.val_episodes = sample_validation(source, cfg.val_tasks, config.eval.batch, cfg.seed + 2, device)
        self.progress = Progress()
        self.log: RunLog | None = None

    # -- the run -------------------------------------------------------------------------------------

    def fit(self, state: dict[str, Any] | None) -> dict[str, Any]:
        """Restore ``state`` (a resume) or start fresh, then train until the last iteration or a signal."""
        resume = state is not None  # the same on every rank: run_on_main hands rank 0's state to all
        if resume:
            self.restore(state)
        self.ctx.run_on_main(lambda: self._open_run_dir(resume))
        cfg, progress = self.cfg, self.progress
        bar = tqdm(total=cfg.iterations, initial=progress.step, dynamic_ncols=True, desc=self.config.name,
                   disable=not (self.show_progress and self.ctx.is_main))
        tick = (time.perf_counter(), progress.step)
        stop = StopRequest()
        stop.install()
        try:
            while progress.step < cfg.iterations:
                stopping = self.step(stop.requested)
                bar.update(1)
                if progress.step % cfg.log_every == 0 or progress.step == cfg.iterations:
                    tick = self.log_window(tick, bar)
                if cfg.val_every and (progress.step % cfg.val_every == 0 or progress.step == cfg.iterations):
                    self.validate()
                if progress.step % cfg.checkpoint_every == 0 or progress.step == cfg.iterations or stopping:
                    self.checkpoint()
                if stopping:
                    self._write_log(event="stopped", message=stopped_message(self.run, "iteration", progress.step))
                    break
        except TrainingDiverged as error:
            self._write_log(event="diverged", message=str(error))
            raise
        finally:
            stop.uninstall()
            bar.close()
            if self.log is not None:
                self.log.close()
        return {"step": progress.step, "best": progress.best, "run_dir": str(self.run.path), "rank": self.ctx.rank,
                "world_size": self.ctx.world_size, "stopped": progress.step < cfg.iterations}

    def _open_run_dir(self, resume: bool) -> None:
        """Rank 0, once everything is built and restored: own the directory, write the config."""
        if not resume:
            self.run.open_new()
        self.run.write_config(self.config)
        self.log = RunLog(self.run.path, resume_step=self.progress.step if resume else None)

    # -- named steps ---------------------------------------------------------------------------------

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint into the learner, optimizer, schedule and generators (every rank)."""
        try:
            self.learner.load_state_dict(state["learner"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise RunError(f"the checkpoint in {self.run.path} does not fit the configured model "
                           f"({str(error).splitlines()[0]}); resume without changing the model, or start a new run"
                           ) from None
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._apply_changed_schedule(state["config"]["train"])
        mine = state["rank_rng"][self.ctx.rank] if "rank_rng" in state else state
        torch.set_rng_state(mine["torch_rng"])
        try:
            self.task_rng.set_state(mine["task_rng"])
        except RuntimeError:  # the run moved to another device type: its generator state does not fit
            self.task_rng.manual_seed(distributed.task_seed(self.cfg.seed, self.ctx.rank) + state["step"])
            warnings.warn(f"resuming on {self.device}: the task stream continues from a new seed (the saved "
                          "generator belongs to another device), so this run is no longer bitwise the "
                          "uninterrupted one", RuntimeWarning, stacklevel=2)
        if "cuda_rng" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self.progress = Progress(state["step"], state["best"], list(state["window"]))

    def _apply_changed_schedule(self, saved: dict[str, Any]) -> None:
        """A resume that changes ``outer_lr`` (or the schedule's length or floor) applies it for real.

        The optimizer's saved state carries the old rate; untouched keys keep it bit for bit.
        """
        if all(saved.get(key) == getattr(self.cfg, key) for key in SCHEDULE_KEYS):
            return
        lr = self.cfg.outer_lr
        if self.scheduler is not None:  # cosine: re-derive from the new ends, at the same step
            step = self.scheduler.last_epoch
            self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
            self.scheduler.T_max, self.scheduler.eta_min = self.cfg.iterations, self.cfg.min_outer_lr
            lo = self.cfg.min_outer_lr
            lr = lo + (lr - lo) * (1 + math.cos(math.pi * min(step, self.cfg.iterations) / self.cfg.iterations)) / 2
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, stop_requested: bool) -> bool:
        """One meta-update; returns whether every rank stops after it (a signal on any rank)."""
        learner, ctx = self.learner, self.ctx
        learner.begin_iteration(self.progress.step)  # e.g. MAML++'s annealed multi-step loss and derivative order
        episode = self.train_tasks.sample(self.local_batch, self.task_rng)
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.meta.backward_chunk:
            out = learner.backward_in_chunks(episode, self.config.meta.backward_chunk)
        else:
            out = learner.meta_loss(episode)
            out.loss.backward()
        if ctx.enabled:  # global means: the gradient and loss of the whole meta-batch
            scalars = [out.loss, out.loss.new_tensor(float(stop_requested))]
            if out.accuracy is not None:
                scalars.append(out.accuracy)
            params = [p for p in learner.parameters() if p.requires_grad and p.grad is not None]
            reduced = ctx.average_gradients(params, scalars)
            loss, accuracy = reduced[0], (reduced[2] if out.accuracy is not None else 0.0)
            stopping = reduced[1] > 0  # any rank asked: all stop after this same iteration
        else:
            loss = out.loss.item()
            accuracy = out.accuracy.item() if out.accuracy is not None else 0.0
            stopping = stop_requested
        grad_norm = _grad_norm(learner, self.cfg.grad_clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise diverged(self.run, f"meta-loss {loss} / meta-gradient norm {grad_norm} at iteration "
                           f"{self.progress.step + 1}", "Lower train.outer_lr or set train.grad_clip, then resume "
                           "(fastmaml train --resume DIR train.outer_lr=...), or restart with a lower meta.inner_lr.")
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        progress = self.progress
        progress.step += 1
        progress.window = [progress.window[0] + loss, progress.window[1] + accuracy, progress.window[2] + 1]
        return bool(stopping)

    def log_window(self, tick: tuple[float, int], bar: tqdm) -> tuple[float, int]:
        """Write the mean training loss (and accuracy) since the last log line."""
        progress, now = self.progress, time.perf_counter()
        loss_sum, accuracy_sum, count = progress.window
        rate = (progress.step - tick[1]) * self.cfg.meta_batch / max(now - tick[0], 1e-9)
        record = {"loss": loss_sum / count, "tasks_per_s": rate}
        if self.classification:
            record["accuracy"] = accuracy_sum / count
        if self.scheduler is not None or self.cfg.outer_lr != self.optimizer.param_groups[0]["lr"]:
            record["outer_lr"] = self.optimizer.param_groups[0]["lr"]
        self._write_log(**record)
        bar.set_postfix(loss=f"{record['loss']:.4g}", tasks_s=f"{rate:.0f}")
        progress.window = [0.0, 0.0, 0]
        return now, progress.step

    def validate(self) -> None:
        """Rank 0 scores the fixed validation episodes and keeps ``best.pt``; the others wait for ``best``."""
        progress = self.progress
        if self.ctx.is_main:
            metrics = validate(self.learner, self.val_episodes, self.cfg.val_steps or None)
            self._write_log(**metrics)
            if is_better(metrics, progress.best, self.classification):
                progress.best = metrics["val_accuracy"] if self.classification else metrics["val_loss"]
                self.run.save("best.pt", {"step": progress.step, "learner": self.learner.state_dict(),
                                          "metrics": metrics})
        progress.best = self.ctx.broadcast_object(progress.best)

    def checkpoint(self) -> None:
        """Write ``last.pt`` (a collective: every rank sends its generator states to rank 0)."""
        ctx, progress = self.ctx, self.progress
        ctx.check_replicas(self.learner, progress.step)
        ranks = ctx.all_gather_object(self._rng_states())
        if not ctx.is_main:
            return
        state = {"step": progress.step, "learner": self.learner.state_dict(), "optimizer": self.optimizer.state_dict(),
                 **ranks[0], "best": progress.best, "window": list(progress.window), "config": self.config.to_dict(),
                 "world_size": ctx.world_size}
        if ctx.enabled:
            state["rank_rng"] = ranks
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        self.run.save_last(state)

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"task_rng": self.task_rng.get_state(), "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return states

    def _write_log(self, **record: Any) -> None:
        if self.log is not None:
            self.log.write(self.progress.step, **record)


def _lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The meta learning-rate schedule: constant (MAML) or cosine-annealed (MAML++)."""
    if cfg.lr_schedule == "constant":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.iterations, eta_min=cfg.min_outer_lr)


def _grad_norm(learner: MAML, clip: float) -> float:
    """Total meta-gradient norm (clipped in place when ``clip`` > 0)."""
    params = [p for p in learner.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip).item()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])).item()
