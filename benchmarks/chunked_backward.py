"""Peak memory and time of one Omniglot 5-way 1-shot meta-iteration (15 queries, meta-batch 32):
one backward over the whole meta-batch vs ``backward_in_chunks``, for both strategies.

Each configuration runs in a fresh process (peak RSS from VmHWM).

    python benchmarks/chunked_backward.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

CONFIGS = [("vmap", 0), ("vmap", 4), ("loop", 0), ("loop", 1)]


def measure(strategy: str, chunk: int) -> dict:
    import torch
    from memory_vs_steps import peak_rss_mib

    import fastmaml

    torch.set_num_threads(1)
    torch.manual_seed(0)
    learner = fastmaml.MAML(fastmaml.ConvNet(5), 0.4, 1, loss="cross_entropy", reduction="sum_over_classes",
                            strategy=strategy)
    optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    episode = fastmaml.Episode(torch.rand(32, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(32, 1),
                               torch.rand(32, 75, 1, 28, 28, generator=g),
                               torch.arange(5).repeat_interleave(15).repeat(32, 1))
    base, times = peak_rss_mib(), []
    for _ in range(3):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if chunk:
            learner.backward_in_chunks(episode, chunk)
        else:
            learner.meta_loss(episode).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"strategy": strategy, "chunk": chunk, "peak_mib": peak_rss_mib() - base, "ms": 1e3 * sorted(times)[1]}


def main() -> None:
    print("| strategy | backward chunk | peak MiB (rise) | ms / meta-iteration |")
    print("|---|---|---|---|")
    for strategy, chunk in CONFIGS:
        code = (f"import json, sys; sys.path.insert(0, {sys.path[0]!r}); import chunked_backward as c; "
                f"print(json.dumps(c.measure({strategy!r}, {chunk})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {strategy} | {chunk or 'whole meta-batch'} | {row['peak_mib']:.0f} | {row['ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
