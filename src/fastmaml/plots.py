"""PNG figures of a run: learning curves, metric vs inner steps (paper Fig. 3), sinusoid fits (Fig. 2)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fastmaml.experiment import build_learner, build_tasks  # noqa: E402
from fastmaml.rules import SGD  # noqa: E402
from fastmaml.runs import RunDir, load_run_config, read_metrics  # noqa: E402


def plot_learning_curves(run_dir: Path) -> Path:
    """Training loss (and accuracy) and validation metrics against iterations."""
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    has_acc = any("val_accuracy" in r for r in val)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train meta-loss", lw=1)
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("query loss")
    ax.set_yscale("log")
    ax.legend()
    if has_acc:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in train], [100 * r["accuracy"] for r in train], label="train", lw=1)
        ax.plot([r["step"] for r in val], [100 * r["val_accuracy"] for r in val], "o-", label="validation", ms=3)
        ax.set_xlabel("iteration")
        ax.set_ylabel("query accuracy (%)")
        ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "learning_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_steps(run_dirs: list[Path], labels: list[str], out: Path) -> Path:
    """Metric vs number of inner steps, one panel per K, one line per run (paper Fig. 3)."""
    results = [json.loads((Path(d) / "eval.json").read_text()) for d in run_dirs]
    shots = list(results[0]["by_shots"])
    classification = "accuracy" in results[0]["by_shots"][shots[0]]
    metric = "accuracy" if classification else "loss"
    fig, axes = plt.subplots(1, len(shots), figsize=(4.5 * len(shots), 3.8), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for result, label in zip(results, labels):
            if k not in result["by_shots"]:
                continue
            curve = result["by_shots"][k][metric]
            scale = 100 if classification else 1
            mean = torch.tensor(curve["mean"]) * scale
            ci = torch.tensor(curve["ci95"]) * scale
            steps = range(len(mean))
            ax.plot(steps, mean, "o-", ms=3, label=label)
            ax.fill_between(steps, mean - ci, mean + ci, alpha=0.25)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("accuracy (%)" if classification else "mean squared error")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def plot_sinusoid_fits(run_dirs: list[Path], labels: list[str], out: Path, shots: tuple[int, ...] = (5, 10),
                       seed: int = 3) -> Path:
    """True function, K points, and predictions before and after 1 and 10 steps (paper Fig. 2)."""
    fig, axes = plt.subplots(len(run_dirs), len(shots), figsize=(5.5 * len(shots), 3.6 * len(run_dirs)),
                             squeeze=False)
    for row, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        config = load_run_config(run_dir, ["train.device=cpu"])
        learner = build_learner(config, torch.device("cpu"))
        learner.load_state_dict(RunDir(run_dir).load_checkpoint("best")["learner"])
        eval_lr = json.loads((Path(run_dir) / "eval.json").read_text())["inner_lr"] if (
            Path(run_dir) / "eval.json").exists() else config.meta.inner_lr
        for col, k in enumerate(shots):
            tasks = build_tasks(config, "test", torch.device("cpu"), shots=k, queries=0)
            generator = torch.Generator().manual_seed(seed + k)
            amplitude, phase = tasks.sample_functions(1, generator)
            episode = tasks.episode_for(amplitude, phase, generator)
            grid = torch.linspace(-5, 5, 200).view(-1, 1)
            ax = axes[row, col]
            ax.plot(grid, tasks.target(grid.view(1, -1, 1), amplitude, phase)[0], "r", lw=2, label="ground truth")
            ax.plot(episode.support_x[0], episode.support_y[0], "^", color="purple", ms=8, label="used for grad")
            rule = SGD(eval_lr) if eval_lr != config.meta.inner_lr else None
            for steps, style in ((0, ":"), (1, "--"), (10, "-")):
                model = learner.adapt(episode.support_x[0], episode.support_y[0], steps=steps, rule=rule)
                ax.plot(grid, model(grid), style, color="green" if steps == 10 else "tab:blue",
                        label="pre-update" if steps == 0 else f"{steps} grad step{'s' if steps > 1 else ''}")
            ax.set_ylim(-5.5, 5.5)
            ax.set_title(f"{label}, K = {k}")
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def plot_episode(run_dir: Path, out: Path, steps: int | None = None, seed: int = 0, max_queries: int = 3) -> Path:
    """One test task: the support images with their labels, and query images with the adapted
    model's predictions (green when right, red when wrong)."""
    config = load_run_config(run_dir, ["train.device=cpu"])
    learner = build_learner(config, torch.device("cpu"))
    learner.load_state_dict(RunDir(run_dir).load_checkpoint("best")["learner"])
    steps = config.eval.steps if steps is None else steps
    ways, shots = config.task.ways, config.eval.shots[0]
    tasks = build_tasks(config, "test", torch.device("cpu"), shots=shots, queries=max_queries)
    episode = tasks.sample(1, torch.Generator().manual_seed(seed))
    model = learner.adapt(episode.support_x[0], episode.support_y[0], steps=steps)
    predicted = model(episode.query_x[0]).argmax(-1)
    columns = shots + max_queries
    fig, axes = plt.subplots(ways, columns, figsize=(1.1 * columns, 1.2 * ways), squeeze=False)
    support_by_label = {int(y): [] for y in episode.support_y[0]}
    for x, y in zip(episode.support_x[0], episode.support_y[0]):
        support_by_label[int(y)].append(x)
    query_by_label = {label: [] for label in support_by_label}
    for x, y, p in zip(episode.query_x[0], episode.query_y[0], predicted):
        query_by_label[int(y)].append((x, int(p)))
    for row, label in enumerate(sorted(support_by_label)):
        for col in range(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < shots:
                ax.imshow(support_by_label[label][col][0].numpy(), cmap="gray")
                ax.set_title(f"label {label}", fontsize=7)
            elif col - shots < len(query_by_label[label]):
                image, guess = query_by_label[label][col - shots]
                ax.imshow(image[0].numpy(), cmap="gray")
                ax.set_title(f"pred {guess}", fontsize=7, color="green" if guess == label else "red")
            else:
                ax.axis("off")
    accuracy = (predicted == episode.query_y[0]).float().mean().item()
    fig.suptitle(f"{ways}-way {shots}-shot test task: support | queries after {steps} steps "
                 f"({100 * accuracy:.0f}% right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_rl_learning_curves(run_dir: Path) -> Path:
    """Average return before and after the inner step(s) per meta-iteration of a meta-RL run."""
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["pre_return"] for r in records], label="pre-update")
    ax.plot(steps, [r["post_return"] for r in records], label="post-update")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("average return")
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(run_dir) / "learning_curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_rl_adaptation(results: list[Path], labels: list[str], out: Path) -> Path:
    """The paper's Figure 5: average return vs number of policy-gradient steps, with 95% CIs."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for path, label in zip(results, labels):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} missing: run `fastmaml eval` on that run first")
        curve = json.loads(Path(path).read_text())["return"]
        xs = list(range(len(curve["mean"])))
        ax.errorbar(xs, curve["mean"], yerr=curve["ci95"], marker="o", capsize=3, label=label)
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel("average return")
    ax.set_xticks(xs)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
