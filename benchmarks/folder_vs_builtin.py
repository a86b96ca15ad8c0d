"""The generic folder source against the built-in Omniglot source, on the same images.

Exports the decoded Omniglot store (28x28, strokes bright) into an ImageFolder tree of PNGs, so the
folder source decodes exactly the built-in store's pixels, then times, interleaved in one process:
sampling one meta-batch, and a whole meta-training iteration (sample + inner loop + outer backward
+ Adam) of the 5-way 1-shot preset, built once from ``omniglot_5way1shot`` and once from
``folder_5way1shot`` with the Omniglot settings. Prints medians and the folder/built-in ratio.

    python benchmarks/folder_vs_builtin.py [--data-root DIR] [--out /tmp/omniglot_folder] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastmaml.config import load_config
from fastmaml.experiment import build_learner, build_tasks
from fastmaml.tasks.omniglot import load_omniglot

OMNIGLOT_SETTINGS = ["task.image_size=28", "task.channels=1", "task.rotation=per_task", "task.queries=15",
                     "model.filters=64", "meta.inner_lr=0.4", "meta.inner_steps=1", "train.meta_batch=32"]


def export_store(store: torch.Tensor, out: Path) -> Path:
    """One folder per store class (``class_0000`` ...), one PNG per drawing; skipped if already there."""
    if (out / "done").exists():
        return out
    for c in range(store.shape[0]):
        folder = out / f"class_{c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for d in range(store.shape[1]):
            Image.fromarray(store[c, d].numpy()).save(folder / f"{d:02d}.png")
    (out / "done").write_text("")
    return out


def time_once(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="", help="folder with the Omniglot zips (default FASTMAML_DATA)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/omniglot_folder"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = load_omniglot(args.data_root or None)
    root = export_store(store, args.out)
    device = torch.device("cpu")
    builtin = load_config("omniglot_5way1shot", [f"task.data_root={args.data_root}"] if args.data_root else [])
    folder = load_config("folder_5way1shot", [f"task.data_root={root}", *OMNIGLOT_SETTINGS,
                                              "meta.reduction=sum_over_classes"])
    runs = {}
    for label, config in (("built-in omniglot", builtin), ("folder", folder)):
        torch.manual_seed(0)
        learner = build_learner(config, device)
        tasks = build_tasks(config, "train", device)
        optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
        generator = torch.Generator().manual_seed(0)

        def iteration(learner=learner, tasks=tasks, optimizer=optimizer, generator=generator,
                      batch=config.train.meta_batch) -> None:
            optimizer.zero_grad()
            learner.meta_loss(tasks.sample(batch, generator)).loss.backward()
            optimizer.step()

        def sample(tasks=tasks, generator=generator, batch=config.train.meta_batch) -> None:
            tasks.sample(batch, generator)

        iteration()  # warm-up
        runs[label] = {"iteration": iteration, "sample": sample, "times": {"iteration": [], "sample": []}}
    for _ in range(args.rounds):  # interleaved: both see the same machine state
        for run in runs.values():
            run["times"]["sample"].append(time_once(run["sample"]))
            run["times"]["iteration"].append(time_once(run["iteration"]))
    medians = {label: {k: statistics.median(v) * 1e3 for k, v in run["times"].items()} for label, run in runs.items()}
    print(f"Omniglot 5-way 1-shot, 15 queries, meta-batch 32, {args.threads} threads, {args.rounds} rounds "
          f"(store {tuple(store.shape)}; folder of {np.prod(store.shape[:2])} PNGs at {root})")
    print("| source | sample ms | meta-iteration ms |")
    print("|---|---|---|")
    for label, m in medians.items():
        print(f"| {label} | {m['sample']:.2f} | {m['iteration']:.1f} |")
    ratio = {k: medians["folder"][k] / medians["built-in omniglot"][k] for k in ("sample", "iteration")}
    print(f"| folder / built-in | {ratio['sample']:.3f} | {ratio['iteration']:.3f} |")


if __name__ == "__main__":
    main()
