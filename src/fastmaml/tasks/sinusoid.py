"""Sinusoid regression tasks (paper section 5.1): y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmaml.episode import Episode


@dataclass(frozen=True)
class SinusoidTasks:
    """Draws K-shot sinusoid tasks, every tensor made directly on ``device``.

    All randomness comes from the ``generator`` passed to :meth:`sample`, so a run that saves
    and restores that generator's state resumes the exact same task stream.
    """

    shots: int = 10
    queries: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def sample_functions(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Amplitudes and phases ``[T]`` of ``num_tasks`` new tasks."""
        amplitude = self._uniform((num_tasks,), self.amplitude, generator)
        phase = self._uniform((num_tasks,), self.phase, generator)
        return amplitude, phase

    def sample_inputs(self, num_tasks: int, count: int, generator: torch.Generator) -> Tensor:
        return self._uniform((num_tasks, count, 1), self.x_range, generator)

    @staticmethod
    def target(x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """y = A sin(x - phi), broadcasting one amplitude and phase per task over ``x [T, n, 1]``."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def sample(self, num_tasks: int, generator: torch.Generator) -> Episode:
        amplitude, phase = self.sample_functions(num_tasks, generator)
        return self.episode_for(amplitude, phase, generator)

    def episode_for(self, amplitude: Tensor, phase: Tensor, generator: torch.Generator) -> Episode:
        """An episode for given task functions (used by plots that need the true curve)."""
        x = self.sample_inputs(amplitude.shape[0], self.shots + self.queries, generator)
        y = self.target(x, amplitude, phase)
        return Episode(x[:, : self.shots], y[:, : self.shots], x[:, self.shots :], y[:, self.shots :])

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
        low, high = bounds
        u = torch.rand(shape, generator=generator, device=generator.device, dtype=self.dtype)
        return (low + (high - low) * u).to(self.device)
