"""Which local class rows take part in one step: every positive plus uniform negatives.

Everything runs on the bank's device with shapes fixed by the global batch size, so a step makes
no host sync (no ``unique``, ``nonzero``, boolean indexing or ``.item()``): the number of distinct
positives is data, so the sample has a static size ``S`` and a device mask says which of its
columns take part.
"""

from __future__ import annotations

import math

import torch

from pfc_ds.head import seeds
from pfc_ds.head.step_rng import StepRng


class ClassSampler:
    """Samples ``max(num_sample, P)`` rows of one shard per step, ``P`` = distinct positives.

    ``num_sample = int(sample_rate * num_local)``. Positives are always kept; when they alone
    exceed ``num_sample`` all of them are taken and no negative is. Negatives are a uniformly
    random subset of the remaining rows: the first distinct non-positive values of a stream of
    uniform draws (a uniform subset by exchangeability), O(num_sample log num_sample); where
    that would need too many draws (more than half the free rows wanted) it is random keys and
    a top-k over the shard instead. The sample has the static size ``S = max(num_sample,
    min(N, num_local))`` for a global batch of ``N``; in the rare case ``S > max(num_sample,
    P)`` (a rate so small that the batch's positives could exceed it) the extra columns are
    real, distinct rows masked out of the loss and the update.
    """

    def __init__(self, num_local: int, sample_rate: float, seed: int, rank: int) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        self.num_local = num_local
        self.sample_rate = sample_rate
        self.num_sample = int(sample_rate * num_local)
        self.rng = StepRng(seeds.sampler(seed, rank))
        self._all: torch.Tensor | None = None  # arange(num_local), kept for full-shard steps

    def size(self, batch: int) -> int:
        """The static sample size for a global batch of ``batch`` labels."""
        return self.static_size(self.num_local, self.sample_rate, batch)

    @staticmethod
    def static_size(num_local: int, sample_rate: float, batch: int) -> int:
        """``S = max(num_sample, min(batch, num_local))``, or the whole shard at rate 1 (the
        memory model asks without building a sampler)."""
        if sample_rate >= 1.0:
            return num_local
        return min(num_local, max(int(sample_rate * num_local), batch))

    def sample(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``local``: each label of the global batch (of a whole accumulation window) minus the
        shard start (any value; out of ``[0, num_local)`` means another rank owns it).

        Returns ``(index, active)``: ``S`` sorted distinct rows, and a ``(S,)`` bool mask of the
        columns in the loss, or ``None`` when all are (always so when ``num_sample`` covers any
        batch).
        """
        n, batch = self.num_local, local.shape[0]
        in_shard = (local >= 0) & (local < n)
        size = self.size(batch)
        if size == n:
            if self._all is None or self._all.device != local.device:
                self._all = torch.arange(n, device=local.device)
            index = self._all
            active = None
            if self.sample_rate < 1.0 and self.num_sample < n:
                active = self._active_all_rows(local, in_shard)
        else:
            pos = torch.where(in_shard, local, n)  # n: "no positive here", sorts last
            pos = pos.sort().values
            first = torch.ones_like(pos, dtype=torch.bool)
            first[1:] = pos[1:] != pos[:-1]
            is_pos = first & (pos < n)
            gen = self.rng.generator(local.device)
            if 2 * size > n - batch:
                index, order = self._dense(pos, size, gen)
            else:
                index, order = self._sparse(pos, is_pos, size, gen)
            active = None
            if self.num_sample < batch:  # positives alone might exceed num_sample
                wanted = torch.clamp(is_pos.sum(), min=self.num_sample)
                active = order < wanted
        return index, active

    def targets(self, index: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Each label's column in ``index`` (from ``sample`` over labels including these), or
        -1 where another rank owns the class."""
        n = self.num_local
        in_shard = (local >= 0) & (local < n)
        target = torch.searchsorted(index, local.clamp(0, n - 1))
        return torch.where(in_shard, target, -1)

    def _active_all_rows(self, local: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
        """Whole shard sampled but fewer rows wanted: positives plus random negatives."""
        gen = self.rng.generator(local.device)
        keys = torch.rand(self.num_local + 1, device=local.device, generator=gen)
        keys.index_fill_(0, torch.where(in_shard, local, self.num_local), -1.0)
        rank = keys[:-1].argsort().argsort()
        wanted = torch.clamp((keys[:-1] < 0).sum(), min=self.num_sample)
        return rank < wanted

    def _dense(self, pos: torch.Tensor, size: int, gen: torch.Generator):
        """Random keys over the shard, positives forced first; O(num_local)."""
        n = self.num_local
        keys = torch.rand(n + 1, device=pos.device, generator=gen)
        keys.index_fill_(0, pos, -1.0)  # pos == n (no positive) lands on the spare key
        keys[n] = 2.0
        chosen = torch.topk(keys, size, largest=False, sorted=True).indices
        return chosen.sort()  # (rows, each row's rank in the selection: positives first)

    def _sparse(self, pos: torch.Tensor, is_pos: torch.Tensor, size: int, gen: torch.Generator):
        """Positives, then the first distinct non-positive uniform draws; O(S log S)."""
        n, batch = self.num_local, pos.shape[0]
        want = size + batch
        # Draws expected to cover ``want`` distinct values, plus ~10 sd (distinct counts have
        # variance below their mean) so a shortage is practically impossible.
        m = int(-n * math.log1p(-want / n)) + 10 * math.isqrt(want) + 64
        draws = torch.randint(n, (m,), device=pos.device, generator=gen)
        values, arrival = draws.sort(stable=True)
        fresh = torch.ones_like(values, dtype=torch.bool)
        fresh[1:] = values[1:] != values[:-1]
        hit = torch.searchsorted(pos, values).clamp_max(batch - 1)
        fresh &= pos[hit] != values
        big = torch.iinfo(torch.int64).max
        keys = torch.cat([torch.where(is_pos, -1, big), torch.where(fresh, arrival, big)])
        candidates = torch.cat([pos, values])
        pick = torch.topk(keys, size, largest=False, sorted=True).indices
        return candidates[pick].sort()  # (rows, each row's rank in the selection)

    def state(self) -> torch.Tensor:
        return self.rng.state()

    def load_state(self, state: torch.Tensor) -> None:
        self.rng.load_state(state)
