"""fastmaml.runtime: freed memory stays in the process (in a subprocess: the setting is process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastmaml.train
from fastmaml.config import load_config

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from fastmaml import runtime
    if sys.argv[1] == "reuse":
        assert runtime.reuse_freed_memory() and runtime.reuse_freed_memory()  # idempotent
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written once
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults[1:]))  # the heap settles within the first few blocks
""")


def _faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_reused_memory_is_not_page_faulted_in_again() -> None:
    pages = 64 * 2**20 // 4096
    assert _faults("system") > pages // 2  # glibc mmaps every block anew: none is reused
    assert _faults("reuse") < pages // 20  # later blocks reuse the pages of earlier ones


@pytest.mark.parametrize("asked", [False, True])
def test_train_applies_it_only_when_asked(asked: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(fastmaml.train.runtime, "reuse_freed_memory", lambda: calls.append(1) or True)
    overrides = ["train.iterations=2", "train.meta_batch=2", "train.val_every=0", "train.log_every=1",
                 f"train.reuse_freed_memory={str(asked).lower()}"]
    fastmaml.train.train(load_config("sinusoid", overrides), tmp_path / "run", progress=False)
    assert calls == ([1] if asked else [])
