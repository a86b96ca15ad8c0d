"""Data-parallel training under torchrun: 2 gloo processes on 127.0.0.1 equal one process on the union of tasks.

The oracle is plain single-process MAML: each step it samples every rank's shard with that rank's
generator, concatenates the shards into one episode and takes one Adam step on its mean loss.
"""

from __future__ import annotations

import doctest
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmaml.distributed
from fastmaml import checkpoint
from fastmaml.cli import main as cli_main
from fastmaml.config import load_config
from fastmaml.distributed import DistContext, from_env, shard_size, task_seed
from fastmaml.episode import Episode
from fastmaml.experiment import build_learner, build_tasks
from fastmaml.runs import read_metrics
from fastmaml.train import train

WORLD = 2
STEPS = 6
QUICK = ["train.meta_batch=4", "train.log_every=1", "train.val_every=3", "train.val_tasks=20",
         "train.checkpoint_every=3", "train.threads=1"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

# Run by torchrun: the CLI inside a process group the worker made itself (train() must use it and
# leave it open), then every rank saves its own parameters and last meta-gradient (Adam is blind to
# the gradient's scale, so a sum instead of a mean would pass a parameter check), then a drifted
# replica must be caught.
WORKER = '''
import sys
import torch
import torch.distributed as dist
import fastmaml.train as trainer
from fastmaml.cli import main
from fastmaml.distributed import DistContext, ReplicaMismatch

out, args = sys.argv[1], sys.argv[2:]
dist.init_process_group("gloo")
learners = []
build = trainer.build_learner
trainer.build_learner = lambda *a, **k: learners.append(build(*a, **k)) or learners[-1]
assert main(args) == 0
assert dist.is_initialized(), "train() closed a process group it did not open"
rank, learner = dist.get_rank(), learners[0]
torch.save(learner.state_dict(), f"{out}/rank{rank}.pt")
torch.save({k: p.grad for k, p in learner.named_parameters()}, f"{out}/grad{rank}.pt")  # the last step's
if rank == 1:
    with torch.no_grad():
        next(learner.parameters()).add_(1e-6)
try:
    DistContext(rank, dist.get_world_size()).check_replicas(learner, step=STEPS)
except ReplicaMismatch as error:
    open(f"{out}/caught{rank}.txt", "w").write(str(error))
dist.destroy_process_group()
'''.replace("STEPS", str(STEPS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node=2`` on the loopback interface, one torch thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _reference(overrides: list[str], steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                           list[float]]:
    """One process, one Adam step per iteration on the union of the ranks' shards.

    Returns the final parameters, the last step's meta-gradient and the loss of every step.
    """
    config = load_config("sinusoid", overrides)
    cfg, cpu = config.train, torch.device("cpu")
    torch.manual_seed(cfg.seed)
    learner = build_learner(config, cpu)
    optimizer = torch.optim.Adam(learner.parameters(), lr=cfg.outer_lr)
    tasks = build_tasks(config, "train", cpu)
    rngs = [torch.Generator().manual_seed(task_seed(cfg.seed, rank)) for rank in range(WORLD)]
    losses = []
    for _ in range(steps):
        shards = [tasks.sample(cfg.meta_batch // WORLD, rng) for rng in rngs]
        assert not torch.equal(shards[0].support_x, shards[1].support_x), "ranks must see different tasks"
        episode = Episode(*(torch.cat([getattr(s, name) for s in shards])
                            for name in ("support_x", "support_y", "query_x", "query_y")))
        assert episode.num_tasks == cfg.meta_batch
        out = learner.meta_loss(episode)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return learner.state_dict(), {k: p.grad for k, p in learner.named_parameters()}, losses


def _curve(run_dir: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in read_metrics(run_dir) for k in ("loss", "val_loss") if k in r]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """An uninterrupted 2-process run of ``STEPS`` iterations (run dir, per-rank outputs, stdout)."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "worker.py").write_text(WORKER)
    result = _torchrun(str(root / "worker.py"), str(root), "train", "sinusoid", *QUICK,
                       f"train.iterations={STEPS}", "--run-dir", str(root / "full"), "--no-progress")
    return root / "full", root, result.stdout


def test_two_ranks_equal_one_process_on_the_union_of_their_tasks(full_run: tuple[Path, Path, str]) -> None:
    run_dir, out, stdout = full_run
    expected, expected_grad, losses = _reference([*QUICK, f"train.iterations={STEPS}"], STEPS)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    grads = [torch.load(out / f"grad{r}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"replicas differ in {key}"
        assert (ranks[0][key] - value).abs().max().item() <= 1e-6, key
    for key, value in expected_grad.items():
        assert torch.equal(grads[0][key], grads[1][key]), f"averaged gradients differ in {key}"
        torch.testing.assert_close(grads[0][key], value, rtol=1e-4, atol=1e-6, msg=key)
    saved = checkpoint.load(run_dir / "last.pt")
    assert saved["world_size"] == WORLD and len(saved["rank_rng"]) == WORLD
    assert all(torch.equal(saved["learner"][k], ranks[0][k]) for k in expected)
    # logged losses are global means: the mean over all meta_batch tasks, as the oracle's
    logged = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert logged == pytest.approx(losses, rel=1e-6)
    # rank 0 alone writes: one line per step, one TensorBoard file, one report
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert stdout.count(f"trained {STEPS} iterations on {WORLD} process(es)") == 1
    # a drifted replica is caught on every rank
    assert all("differ from rank 0's" in (out / f"caught{r}.txt").read_text() for r in range(WORLD))


def test_resume_under_torchrun_replays_the_uninterrupted_run(full_run: tuple[Path, Path, str], tmp_path: Path) -> None:
    """Stop after 3 iterations, resume to 6 with the same world size: same curve, same parameters."""
    full_dir, _, _ = full_run
    stopped = tmp_path / "stopped"
    cli = ["-m", "fastmaml.cli", "train"]
    _torchrun(*cli, "sinusoid", *QUICK, "train.iterations=3", "--run-dir", str(stopped), "--no-progress")
    assert checkpoint.load(stopped / "last.pt")["step"] == 3
    _torchrun(*cli, "--resume", str(stopped), f"train.iterations={STEPS}", "--no-progress")
    assert _curve(stopped) == _curve(full_dir)
    full, resumed = (checkpoint.load(d / "last.pt")["learner"] for d in (full_dir, stopped))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_with_another_world_size_is_refused(full_run: tuple[Path, Path, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _, _ = full_run
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    config_text = (run_dir / "config.yaml").read_text()
    config = load_config(str(run_dir / "config.yaml"), [f"train.iterations={STEPS + 3}"])
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\) but this run has 1.*Resume with 2"):
        train(config, run_dir, resume=True, progress=False)
    assert (run_dir / "config.yaml").read_text() == config_text  # a refused resume leaves the run untouched


def test_meta_batch_that_does_not_split_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Checked from torchrun's variables before any process group is made, identically on every rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert cli_main(["train", "sinusoid", "train.meta_batch=5", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.meta_batch=5 does not split over 2 processes" in err
    assert "train.meta_batch=4 or 6" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="train.meta_batch=24 or 27"):
        shard_size(25, 3)
    assert shard_size(25, 1) == 25 and shard_size(32, 8) == 4


def test_layout_from_torchrun_variables() -> None:
    assert from_env({}) == DistContext()
    ctx = from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (3, 4, 1, False)
    assert ctx.device(torch.device("cuda")) == torch.device("cuda", 1)  # --device cuda: the rank's own GPU
    assert ctx.device(torch.device("cuda:0")) == torch.device("cuda", 0)  # an explicit index is kept
    assert DistContext().device(torch.device("cuda")) == torch.device("cuda")
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT unset; launch with torchrun"):
        from_env({"WORLD_SIZE": "2"})
    # one process is the world_size == 1 case: rank 0 keeps the single-process task seed
    seeds = {task_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert task_seed(0, 0) == 1 and len(seeds) == 32


def test_docstring_example() -> None:
    result = doctest.testmod(fastmaml.distributed, verbose=False)
    assert result.attempted > 0 and result.failed == 0
