"""The ``fastmaml`` command: train, eval, plot, demo, data."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fastmaml.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # section.key=value after an option (`eval RUN --checkpoint last eval.tasks=1000`) is an override too
    stray = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from fastmaml.runs import TrainingDiverged
    from fastmaml.storage import DiskFullError

    try:
        return args.func(args)
    except (TrainingDiverged, DiskFullError) as error:  # the run stopped; its last checkpoint is kept
        print(f"fastmaml: {error}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, OSError) as error:  # bad input, or files that are not as they should be
        print(f"fastmaml: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmaml", description="Model-Agnostic Meta-Learning, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="meta-train from a YAML preset or file (data-parallel under torchrun)",
                       description="Meta-train. Under torchrun (torchrun --nproc_per_node=N -m fastmaml.cli train ...) "
                       "each process trains on meta_batch/N tasks and the meta-gradients are averaged; "
                       "see docs/distributed.md.")
    p.add_argument("config", nargs="?", help="preset name (e.g. sinusoid) or YAML path; omit with --resume")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.iterations=1000")
    p.add_argument("--run-dir", type=Path, help="output directory (default runs/<name>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument("--device", help="cpu | cuda (overrides train.device; under torchrun cuda is cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run on test tasks (mean and 95%% CI per inner step)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("overrides", nargs="*", help="eval protocol overrides, e.g. eval.queries=15 eval.tasks=1000")
    p.add_argument("--checkpoint", choices=["best", "last", "init"], default="best",
                   help="best (by meta-validation; meta-RL runs: last), last, or init (meta-RL: the initial "
                   "policy, the paper's random-initialisation baseline)")
    p.add_argument("--tasks", type=int, help="number of test tasks (default eval.tasks)")
    p.add_argument("--steps", type=int, help="max inner steps (default eval.steps)")
    p.add_argument("--device", help="cpu | cuda")
    p.add_argument("--name", default="eval", help="output stem: RUN_DIR/NAME.json and NAME.md")
    p.add_argument("--episodes", type=Path, metavar="PATH",
                   help="evaluate on fixed episodes: a file of `fastmaml episodes`, or Lake et al.'s one-shot "
                   "runs (a zip or folder of runNN/)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("episodes", help="save the exact test tasks of a run, so other methods score the same ones")
    p.add_argument("run_dir", type=Path)
    p.add_argument("overrides", nargs="*", help="protocol overrides, e.g. eval.queries=15 eval.shots=[5]")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--tasks", type=int, help="number of tasks (default eval.tasks)")
    p.add_argument("--out", type=Path, required=True, help="the episode file to write")
    p.set_defaults(func=_episodes)

    p = sub.add_parser("plot", help="write a run's PNG figures")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="other runs to draw beside it")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run")
    p.set_defaults(func=_plot)

    p = sub.add_parser("data", help="fetch or check a data set")
    p.add_argument("dataset", choices=["omniglot"])
    p.add_argument("--download", type=Path, metavar="DIR", help="fetch the official zips into DIR (checksummed)")
    p.add_argument("--check", type=Path, metavar="DIR", help="decode the zips in DIR into the cache and report")
    p.set_defaults(func=_data)

    p = sub.add_parser("demo", help="a quick real demo: sinusoid MAML vs pretrained, then Omniglot if present")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--iterations", type=int, default=10000, help="sinusoid meta-training iterations")
    p.add_argument("--data-root", help="folder with the Omniglot zips (default FASTMAML_DATA)")
    p.set_defaults(func=_demo)
    return parser


def _is_rl(config_or_run: str | Path | None, run_dir: bool = False) -> bool:
    """Whether a preset/YAML (or a run directory's saved config) describes a meta-RL run."""
    from fastmaml.config import read_yaml
    from fastmaml.rl.config import is_rl_config

    if config_or_run is None:
        return False
    path = Path(config_or_run) / "config.yaml" if run_dir else config_or_run
    if run_dir and not path.is_file():
        return False
    return is_rl_config(read_yaml(str(path))[0])


def _train(args: argparse.Namespace) -> int:
    from fastmaml.runs import load_run_config
    from fastmaml.train import train

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if _is_rl(args.resume, run_dir=True) or (not args.resume and _is_rl(args.config)):
        return _train_rl(args, overrides)
    if args.resume:
        if args.config:
            overrides.insert(0, args.config)  # with --resume every positional is an override
        config = load_run_config(args.resume, overrides)
        run_dir = args.resume
    else:
        if not args.config:
            raise ConfigError("give a config (preset name or YAML path), or --resume RUN_DIR")
        config = load_config(args.config, overrides)
        run_dir = args.run_dir or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(config, run_dir, resume=args.resume is not None, progress=not args.no_progress)
    if result["rank"] == 0:  # under torchrun, one report for the job
        print(f"trained {result['step']} iterations on {result['world_size']} process(es); run directory: {run_dir}")
        if result.get("stopped"):
            print(f"stopped by a signal and checkpointed; continue with: fastmaml train --resume {run_dir}")
    return 0


def _train_rl(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmaml.rl.config import load_rl_config
    from fastmaml.rl.runner import load_run_rl_config, train_rl

    if args.resume:
        if args.config:
            overrides.insert(0, args.config)
        config, run_dir = load_run_rl_config(args.resume, overrides), args.resume
    else:
        config = load_rl_config(args.config, overrides)
        run_dir = args.run_dir or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_rl(config, run_dir, resume=args.resume is not None, progress=not args.no_progress)
    print(f"trained {result['iteration']} meta-iterations; run directory: {run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fastmaml.evaluate import evaluate_run

    overrides = list(args.overrides)
    for key, value in (("eval.tasks", args.tasks), ("eval.steps", args.steps), ("train.device", args.device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if _is_rl(args.run_dir, run_dir=True):
        from fastmaml.rl.runner import evaluate_rl_run

        evaluate_rl_run(args.run_dir, args.checkpoint, overrides, args.name)
    else:
        if args.checkpoint == "init":
            raise ValueError("--checkpoint init exists for meta-RL runs only (the initial policy baseline)")
        if args.episodes:
            from fastmaml.evaluate import evaluate_episodes

            evaluate_episodes(args.run_dir, args.episodes, args.checkpoint, overrides, args.name)
        else:
            evaluate_run(args.run_dir, args.checkpoint, overrides, args.name)
    print((args.run_dir / f"{args.name}.md").read_text())
    return 0


def _episodes(args: argparse.Namespace) -> int:
    from fastmaml.evaluate import write_episodes

    if args.tasks is not None and args.tasks < 1:
        raise ValueError(f"--tasks must be >= 1, got {args.tasks}")
    meta = write_episodes(args.run_dir, args.out, args.split, args.tasks, list(args.overrides))
    print(f"wrote {meta['tasks']} {meta['ways']}-way {meta['shots']}-shot {args.split} tasks of {args.run_dir} "
          f"to {args.out}; evaluate any run on them with: fastmaml eval RUN --episodes {args.out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fastmaml import plots
    from fastmaml.runs import load_run_config

    runs = [args.run_dir, *args.compare]
    if _is_rl(args.run_dir, run_dir=True):
        return _plot_rl(args, runs)
    labels = args.labels or [load_run_config(r).meta.algorithm for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"--labels needs {len(runs)} labels, one per run")
    written = [plots.plot_learning_curves(args.run_dir)]
    if all((r / "eval.json").exists() for r in runs):
        written.append(plots.plot_steps(runs, labels, args.run_dir / "eval_steps.png"))
    if load_run_config(args.run_dir).task.name == "sinusoid":
        written.append(plots.plot_sinusoid_fits(runs, labels, args.run_dir / "sinusoid_fits.png"))
    else:
        written.append(plots.plot_episode(args.run_dir, args.run_dir / "episode.png"))
    for path in written:
        print(path)
    return 0


def _plot_rl(args: argparse.Namespace, runs: list[Path]) -> int:
    """Figure 5 of the paper: return vs policy-gradient steps, one curve per ``--compare`` result.

    Each entry is a run directory (its ``eval.json``) or an evaluation JSON file itself (e.g. a run's
    ``eval_init.json`` for the random-initialisation baseline).
    """
    from fastmaml import plots

    results = [r if r.suffix == ".json" else r / "eval.json" for r in runs]
    labels = args.labels or [r.parent.name if r.suffix == ".json" else r.name for r in runs]
    if len(labels) != len(results):
        raise ValueError(f"--labels needs {len(results)} labels, one per run")
    for path in (plots.plot_rl_learning_curves(args.run_dir),
                 plots.plot_rl_adaptation(results, labels, args.run_dir / "return_vs_steps.png")):
        print(path)
    return 0


def _data(args: argparse.Namespace) -> int:
    from fastmaml.tasks import omniglot

    if not (args.download or args.check):
        raise ValueError("give --download DIR or --check DIR")
    if args.download:
        for path in omniglot.download_omniglot(args.download):
            print(f"verified {path}")
    root = args.check or args.download
    start = time.perf_counter()
    store = omniglot.load_omniglot(root)
    print(f"Omniglot store {tuple(store.shape)} {store.dtype} ready in {time.perf_counter() - start:.1f} s; "
          f"use task.data_root={root} (fastmaml train / eval) or FASTMAML_DATA={root}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fastmaml import plots
    from fastmaml.evaluate import evaluate_run
    from fastmaml.train import train

    out = args.out
    its = args.iterations
    runs = {}
    for label, preset in (("MAML", "sinusoid"), ("pretrained", "sinusoid_pretrain")):
        config = load_config(preset, [f"train.iterations={its}", f"train.val_every={max(its // 5, 1)}",
                                      f"train.checkpoint_every={its}"])
        run_dir = out / preset
        if (run_dir / "last.pt").exists():
            print(f"{run_dir} exists: reusing it (delete it to retrain)")
        else:
            print(f"== meta-training {label} on sinusoids for {its} iterations -> {run_dir}")
            train(config, run_dir)
        evaluate_run(run_dir)
        print((run_dir / "eval.md").read_text())
        runs[label] = run_dir
    labels, dirs = list(runs), list(runs.values())
    for path in (plots.plot_steps(dirs, labels, out / "sinusoid_steps.png"),
                 plots.plot_sinusoid_fits(dirs, labels, out / "sinusoid_fits.png"),
                 plots.plot_learning_curves(dirs[0])):
        print(f"wrote {path}")
    _demo_omniglot(args, out)
    return 0


def _demo_omniglot(args: argparse.Namespace, out: Path) -> None:
    """A short 5-way 1-shot run on the official zips, when they are present."""
    import os

    from fastmaml import plots
    from fastmaml.evaluate import evaluate_run
    from fastmaml.tasks.omniglot import OmniglotDataError, find_omniglot_zips
    from fastmaml.train import train

    candidates = [args.data_root, os.environ.get("FASTMAML_DATA"), "data", "../shared/data"]
    root = None
    for candidate in filter(None, candidates):
        try:
            find_omniglot_zips(candidate)
        except (OmniglotDataError, FileNotFoundError):
            continue
        root = candidate
        break
    if root is None:
        print("== Omniglot skipped (no official zips in --data-root, FASTMAML_DATA, ./data or ../shared/data); "
              "give --data-root DIR with images_background.zip and images_evaluation.zip")
        return
    run_dir = out / "omniglot_5way1shot"
    config = load_config("omniglot_5way1shot", [
        f"task.data_root={root}", "task.queries=5", "train.meta_batch=16", "train.iterations=400",
        "train.val_every=200", "train.val_tasks=100", "train.checkpoint_every=200",
        "eval.tasks=200", "eval.steps=3", "eval.queries=5",
    ])
    if not (run_dir / "last.pt").exists():
        print(f"== meta-training MAML on Omniglot 5-way 1-shot for 400 iterations -> {run_dir}")
        train(config, run_dir)
    evaluate_run(run_dir)
    print((run_dir / "eval.md").read_text())
    print(f"wrote {plots.plot_learning_curves(run_dir)}")


if __name__ == "__main__":
    sys.exit(main())
