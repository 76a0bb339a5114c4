"""A random stream whose whole state is two integers, drawn on whatever device asks.

``torch.Generator`` state is device-specific (a CPU Mersenne Twister vs a CUDA Philox seed and
offset), so a checkpoint written on one could not be loaded on the other. Here each draw seeds a
generator on the drawing device from ``(seed, counter)`` and bumps the counter: a CPU checkpoint
resumes on a GPU and back, and seeding is a host-side call, so drawing makes no host sync.
"""

from __future__ import annotations

import torch

from pfc_ds.head import seeds


class StepRng:
    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.counter = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """A generator on ``device`` for the next draw; every call gives a fresh stream."""
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(seeds.draw(self.seed, self.counter))
        self.counter += 1
        return gen

    def state(self) -> torch.Tensor:
        return torch.tensor([self.seed, self.counter], dtype=torch.int64)

    def load_state(self, state: torch.Tensor) -> None:
        if state.dtype != torch.int64 or state.numel() != 2:
            raise ValueError(f"sampler RNG state must be 2 int64 (seed, counter), got {state}")
        self.seed, self.counter = (int(v) for v in state.tolist())
