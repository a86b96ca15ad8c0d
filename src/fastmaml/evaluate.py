"""Meta-test evaluation: adapt on fresh test tasks, report mean and 95% CI per inner step.

Every model evaluated from the same config sees the same test tasks (fixed seed per K), so
MAML and its baselines are compared on identical tasks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastmaml.config import Config
from fastmaml.episode import Episode
from fastmaml.experiment import TaskSource, build_learner, build_tasks, is_classification, resolve_device
from fastmaml.learners import MAML
from fastmaml.rules import SGD, InnerRule
from fastmaml.runs import RunDir, load_run_config


@dataclass
class Curve:
    """Mean and 95% confidence half-width of a metric after 0..steps inner updates."""

    mean: list[float]
    ci95: list[float]


def mean_ci95(values: torch.Tensor) -> Curve:
    """Per-column mean and 1.96 * standard error over tasks (rows) of ``values [n, steps+1]``."""
    values = values.double()
    n = values.shape[0]
    std = values.std(dim=0, unbiased=True) if n > 1 else torch.zeros(values.shape[1], dtype=values.dtype)
    return Curve(values.mean(0).tolist(), (1.96 * std / math.sqrt(n)).tolist())


def sample_validation(tasks: TaskSource, count: int, batch: int, seed: int, device: torch.device) -> list[Episode]:
    """A fixed set of held-out episodes: the same at every validation, after resume, and for every model."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return [tasks.sample(min(batch, count - start), generator) for start in range(0, count, batch)]


def evaluate_tasks(learner: MAML, tasks: TaskSource, num_tasks: int, steps: int, batch: int, seed: int,
                   device: torch.device, rule: InnerRule | None = None) -> dict[str, Curve]:
    """Loss (and accuracy) curves over ``num_tasks`` test tasks drawn with ``seed``."""
    losses, accuracies = [], []
    for episode in sample_validation(tasks, num_tasks, batch, seed, device):
        loss, accuracy = learner.evaluate(episode, steps, rule=rule)
        losses.append(loss.cpu())
        if accuracy is not None:
            accuracies.append(accuracy.cpu())
    curves = {"loss": mean_ci95(torch.cat(losses))}
    if accuracies:
        curves["accuracy"] = mean_ci95(torch.cat(accuracies))
    return curves


def tune_step_size(learner: MAML, tasks: TaskSource, candidates: list[float], config: Config,
                   device: torch.device) -> float:
    """The step size with the lowest mean query loss over steps 1..S on validation tasks.

    This is the paper's "automatically tuned step size" for the pretrained baseline; test tasks
    are never used to choose it.
    """
    ev = config.eval
    scores = {}
    for lr in candidates:
        curves = evaluate_tasks(learner, tasks, min(ev.tasks, 200), ev.steps, ev.batch, ev.seed + 7919, device,
                                rule=SGD(lr))
        mean = curves["loss"].mean[1:]
        scores[lr] = sum(mean) / len(mean) if all(map(math.isfinite, mean)) else math.inf
    return min(scores, key=scores.__getitem__)


@dataclass
class LoadedRun:
    """A run's learner restored from a checkpoint, with the test-time step size its config asks for."""

    run: RunDir
    config: Config
    learner: MAML
    device: torch.device
    checkpoint: str
    step: int
    inner_lr: float
    rule: InnerRule | None

    def header(self) -> dict[str, Any]:
        return {"run_dir": str(self.run.path), "checkpoint": self.checkpoint, "checkpoint_step": self.step,
                "inner_lr": self.inner_lr, "algorithm": self.config.meta.algorithm, "device": str(self.device)}


def load_run(run_dir: Path, which: str = "best", overrides: list[str] | None = None) -> LoadedRun:
    """Rebuild a run's learner from its ``config.yaml`` and load checkpoint ``which`` (best, else last)."""
    config = load_run_config(run_dir, overrides)
    device = resolve_device(config.train.device)
    run = RunDir(run_dir)
    state = run.load_checkpoint(which, map_location=device)
    learner = build_learner(config, device)
    learner.load_state_dict(state["learner"])
    ev = config.eval
    lr = ev.inner_lr or config.meta.inner_lr
    if ev.tune_lr:
        lr = tune_step_size(learner, build_tasks(config, "val", device, shots=ev.shots[0], queries=ev.queries),
                            ev.tune_lr, config, device)
    rule = SGD(lr) if lr != config.meta.inner_lr else None
    return LoadedRun(run, config, learner, device, run.checkpoint_name(which), state["step"], lr, rule)


def load(run_dir: str | Path, which: str = "best", device: str | None = None) -> MAML:
    """The learner a run trained, rebuilt from its ``config.yaml`` with checkpoint ``which`` (best, else last).

    Ready to ``adapt`` to a new task: ``fastmaml.load("runs/omniglot").adapt(x, y, steps=3)(queries)``.
    Supervised runs only (meta-RL runs hold a policy: ``fastmaml eval`` evaluates them).
    """
    overrides = [f"train.device={device}"] if device else []
    learner = load_run(Path(run_dir), which, overrides).learner
    return learner.eval()


def evaluate_run(run_dir: Path, which: str = "best", overrides: list[str] | None = None,
                 name: str = "eval") -> dict[str, Any]:
    """Evaluate a run's checkpoint for every K in ``eval.shots``; writes ``<name>.json`` and ``<name>.md``.

    ``overrides`` (``section.key=value``) change the evaluation protocol without retraining, e.g.
    ``["eval.queries=15", "eval.tasks=1000"]`` for the modern few-shot protocol.
    """
    loaded = load_run(run_dir, which, overrides)
    config, dev, ev = loaded.config, loaded.device, loaded.config.eval
    results: dict[str, Any] = {**loaded.header(), "tasks": ev.tasks, "steps": ev.steps, "by_shots": {}}
    for shots in ev.shots:
        tasks = build_tasks(config, "test", dev, shots=shots, queries=ev.queries)
        curves = evaluate_tasks(loaded.learner, tasks, ev.tasks, ev.steps, ev.batch, ev.seed + shots, dev,
                                rule=loaded.rule)
        results["by_shots"][str(shots)] = {k: asdict(v) for k, v in curves.items()}
    results["queries"] = ev.queries
    _write_results(loaded, name, results)
    return results


def write_episodes(run_dir: Path, out: Path, split: str = "test", tasks: int | None = None,
                   overrides: list[str] | None = None) -> dict[str, Any]:
    """Save the exact ``split`` tasks ``fastmaml eval`` would draw (first ``eval.shots``) to ``out``.

    Two methods evaluated with ``--episodes out`` then score the very same tasks, wherever they run.
    """
    from fastmaml.fixed_episodes import save_episodes

    config = load_run_config(run_dir, overrides)
    device, ev = torch.device("cpu"), config.eval
    count, shots = tasks or ev.tasks, ev.shots[0]
    source = build_tasks(config, split, device, shots=shots, queries=ev.queries)
    episodes = sample_validation(source, count, ev.batch, ev.seed + shots, device)
    meta = {"run": str(run_dir), "task": config.task.name, "split": split, "ways": config.task.ways,
            "shots": shots, "queries": ev.queries, "seed": ev.seed + shots, "tasks": count}
    save_episodes(out, episodes, meta)
    return meta


def evaluate_episodes(run_dir: Path, path: Path, which: str = "best", overrides: list[str] | None = None,
                      name: str = "eval") -> dict[str, Any]:
    """Evaluate on fixed episodes: a file of ``fastmaml episodes``, or Lake et al.'s one-shot runs (a zip or
    folder of ``runNN/``); writes ``NAME.json`` (with per-episode accuracies) and ``NAME.md``."""
    from fastmaml.fixed_episodes import evaluate_fixed, load_episodes, load_lake_runs

    loaded = load_run(run_dir, which, overrides)
    path = Path(path)
    if path.is_dir() or path.suffix == ".zip":
        runs = load_lake_runs(path)
        episodes, meta = runs, {"source": "lake", "ways": 20, "shots": 1, "queries": 1, "runs": [r for r, _ in runs]}
    else:
        episodes, meta = load_episodes(path)
    if meta.get("ways", loaded.config.task.ways) != loaded.config.task.ways:
        raise ValueError(f"{path} holds {meta['ways']}-way episodes but {run_dir} is a {loaded.config.task.ways}-way "
                         "learner; evaluate a run trained with that many ways")
    steps = loaded.config.eval.steps
    scored = evaluate_fixed(loaded.learner, episodes, steps, device=loaded.device, rule=loaded.rule)
    curves = {"loss": mean_ci95(scored["loss"])}
    if scored["accuracy"] is not None:
        curves["accuracy"] = mean_ci95(scored["accuracy"])
    results: dict[str, Any] = {
        **loaded.header(), "episodes": str(path), "episodes_sha256": meta.get("sha256"), "tasks": len(scored["loss"]),
        "steps": steps, "queries": meta.get("queries", "?"),
        "by_shots": {str(meta.get("shots", "?")): {k: asdict(v) for k, v in curves.items()}},
        "per_episode": {k: scored[k].tolist() for k in ("loss", "accuracy") if scored[k] is not None},
    }
    for key in ("runs", "error_rate_percent"):
        if key in scored:
            results[key] = scored[key]
    _write_results(loaded, name, results)
    return results


def _write_results(loaded: LoadedRun, name: str, results: dict[str, Any]) -> None:
    table = format_table(results, is_classification(loaded.config))
    if "error_rate_percent" in results:
        errors = results["error_rate_percent"]
        table += ("\nLake et al.'s measure, mean error rate over the " + str(len(results["runs"])) + " runs: "
                  + ", ".join(f"{e:.1f}% after {s} step{'' if s == 1 else 's'}" for s, e in enumerate(errors))
                  + " (people: 4.5%)\n")
    loaded.run.write_text(f"{name}.json", json.dumps(results, indent=1))
    loaded.run.write_text(f"{name}.md", table)


def format_table(results: dict[str, Any], classification: bool) -> str:
    """A markdown table: one row per K, one column per number of inner steps."""
    metric = "accuracy" if classification else "loss"
    steps = results["steps"]
    name = "accuracy (%)" if classification else "MSE"
    lines = [
        f"{results['algorithm']} — {name} on {results['tasks']} test tasks "
        f"({results['queries']} {'query examples per class' if classification else 'query points per task'}), "
        "mean ± 95% CI, "
        f"inner lr {results['inner_lr']:g}, checkpoint {results['checkpoint']} (step {results['checkpoint_step']})",
        "",
        "| K | " + " | ".join(f"{s} step{'' if s == 1 else 's'}" for s in range(steps + 1)) + " |",
        "|---" * (steps + 2) + "|",
    ]
    scale = 100.0 if classification else 1.0
    for shots, curves in results["by_shots"].items():
        curve = curves[metric]
        cells = [f"{m * scale:.3f} ± {c * scale:.3f}" for m, c in zip(curve["mean"], curve["ci95"])]
        lines.append(f"| {shots} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
