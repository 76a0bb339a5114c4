"""Which local class rows take part in one step: every positive plus uniform negatives."""

from __future__ import annotations

import math

import torch

from pfc_ds.head import seeds


class ClassSampler:
    """Samples ``num_sample = int(sample_rate * num_local)`` rows of one shard per step.

    Positives are always kept; when they alone exceed ``num_sample`` all of them are taken and
    no negative is. Negatives are a uniformly random subset of the remaining rows: the first
    ``k`` distinct non-positive values of a stream of uniform draws, which is a uniform
    ``k``-subset by exchangeability. That costs O(num_sample log num_sample), not the
    O(num_local) of random keys + top-k (40 ms of a 500 ms step at 1M classes, measured); above
    half the free rows, where coupon collecting gets slow, it falls back to random keys + top-k.
    Neither touches the ``num_local x D`` weights. The generator is per rank and its state is
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
        self.generator = torch.Generator().manual_seed(seeds.sampler(seed, rank))

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
            negatives = self._negatives(unique.cpu(), self.num_sample - len(unique))
            index = torch.cat([unique, negatives.to(self.device)]).sort().values
        return index, torch.searchsorted(index, positives)

    def _negatives(self, positives: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` distinct uniform rows outside ``positives`` (a sorted CPU tensor)."""
        n, p = self.num_local, len(positives)
        if 2 * k > n - p:  # dense: random keys + top-k beats coupon collecting
            keys = torch.rand(n, generator=self.generator)
            keys[positives] = 2.0  # never among the k smallest, as k <= n - p
            return torch.topk(keys, k, largest=False, sorted=False).indices
        # Draws that cover k + p distinct values in expectation, plus slack.
        first = int(-n * math.log1p(-(k + p) / n) * 1.02) + 64
        draws = torch.randint(n, (first,), generator=self.generator)
        while True:
            values, inverse = torch.unique(draws, return_inverse=True)
            keep = ~torch.isin(values, positives)
            have = int(keep.sum())
            if have >= k:
                order = torch.arange(len(draws))
                arrival = torch.full((len(values),), len(draws))
                arrival.scatter_reduce_(0, inverse, order, "amin")
                return values[keep][arrival[keep].argsort()[:k]]
            # Each new draw is new and non-positive with probability (n - have - p) / n.
            more = 64 + int(2 * (k - have) * n / max(n - have - p, 1))
            draws = torch.cat([draws, torch.randint(n, (more,), generator=self.generator)])

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
