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
