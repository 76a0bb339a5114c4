"""Which local class rows take part in one step: every positive plus uniform negatives."""

from __future__ import annotations

import torch


class ClassSampler:
    """Samples ``num_sample = int(sample_rate * num_local)`` rows of one shard per step.

    Positives are always kept; when they alone exceed ``num_sample`` all of them are taken and
    no negative is. Negatives are a uniformly random subset of the remaining rows: random keys
    with the positives forced to the top, then a top-k, so a step costs O(num_local) scalar work
    and never touches the ``num_local x D`` weights. The generator is per rank and its state is
    checkpointed with the head, so a resumed run samples the same rows.
    """

    def __init__(
        self, num_local: int, sample_rate: float, seed: int, rank: int, device: torch.device
    ) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self.num_local = num_local
        self.sample_rate = sample_rate
        self.num_sample = int(sample_rate * num_local)
        self.device = torch.device(device)
        # The CPU generator keeps the state format (and so checkpoints) device-independent.
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * rank + 1)

    def sample(self, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positives``: local rows of the batch's targets (repeats allowed).

        Returns ``(index, remap)``: the sorted sampled rows and, for each entry of ``positives``,
        its position in ``index``.
        """
        unique = torch.unique(positives)
        if self.sample_rate >= 1.0:
            index = torch.arange(self.num_local, device=self.device)
        elif len(unique) >= self.num_sample:
            index = unique
        else:
            keys = torch.rand(self.num_local, generator=self.generator).to(self.device)
            keys[unique] = 2.0
            index = torch.topk(keys, self.num_sample, sorted=False).indices.sort().values
        return index, torch.searchsorted(index, positives)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
