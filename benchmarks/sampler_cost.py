"""Share of a meta-iteration spent sampling episodes on the device (Omniglot presets).

The sampler draws classes, rotations and examples with a few tensor ops and gathers the pixels
from the in-memory uint8 store. This times it against a whole meta-training iteration (sample +
inner loop + outer backward + Adam) of the same preset, interleaved, and prints the share.

    python benchmarks/sampler_cost.py [--data-root DIR] [--presets omniglot_5way1shot omniglot_20way1shot]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastmaml.config import load_config
from fastmaml.experiment import build_learner, build_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="", help="folder with the Omniglot zips (default FASTMAML_DATA)")
    parser.add_argument("--presets", nargs="+", default=["omniglot_5way1shot", "omniglot_20way1shot"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("| preset | sample ms | meta-iteration ms | sampler share |")
    print("|---|---|---|---|")
    for preset in args.presets:
        overrides = [f"task.data_root={args.data_root}"] if args.data_root else []
        config = load_config(preset, overrides)
        tasks = build_tasks(config, "train", device)
        learner = build_learner(config, device)
        optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
        generator = torch.Generator(device=device).manual_seed(0)
        sample_ms, step_ms = [], []
        for round_ in range(args.rounds + 1):
            start = time.perf_counter()
            episode = tasks.sample(config.train.meta_batch, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sampled = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            learner.meta_loss(episode).loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:  # the first round warms up
                sample_ms.append(1e3 * (sampled - start))
                step_ms.append(1e3 * (time.perf_counter() - start))
        s, t = statistics.median(sample_ms), statistics.median(step_ms)
        print(f"| {preset} | {s:.2f} | {t:.0f} | {100 * s / t:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
