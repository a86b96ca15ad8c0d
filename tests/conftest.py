"""Shared test setup: every test starts from the same seed and must leave global dtype alone."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_guard_default_dtype():
    """Seed torch before each test; fail any test that changes the global default dtype."""
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    yield
    after = torch.get_default_dtype()
    torch.set_default_dtype(before)
    assert after == before, f"test changed the default dtype from {before} to {after}; use .double() on models"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors run fastest, and reproducibly, on one intra-op thread (2-core CI machines)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_threads():
    """A test that trains with train.threads=N sets torch's process-wide thread count: put it back, so
    later tests' float32 tolerances are measured at the one thread they assume."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_omniglot_cache(tmp_path_factory: pytest.TempPathFactory):
    """One decode of the real Omniglot zips per test session, shared by every test that needs it."""
    return tmp_path_factory.mktemp("omniglot-cache")
