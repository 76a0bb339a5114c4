"""Every random stream of a run, derived from its one ``seed`` in one place.

Streams must not collide (the centres of block 3 must not equal rank 3's sampler), and each must
be a pure function of what defines it, so one seed gives the same centres at any world size and a
resharded run gets fresh but reproducible samplers. Stochastic rounding draws from none of them:
its bits are a hash keyed by the run's seed and the optimizer step (``rounding.py``).
"""

from __future__ import annotations

_STRIDE = 1_000_003  # a prime above any block, rank or step count mixed in below
_RANK = 7_919
_RANK2 = 104_729


def centre_block(seed: int, block: int) -> int:
    """Initial centres of one block of global rows (independent of the sharding)."""
    return seed * _STRIDE + block


def sampler(seed: int, rank: int) -> int:
    """A rank's negative-sampling stream."""
    return seed * _STRIDE + _RANK * rank + 1


def resharded_sampler(seed: int, world: int, rank: int) -> int:
    """A rank's sampler after resharding to ``world`` ranks (the old streams do not map)."""
    return (seed * _STRIDE + world * _RANK + rank * _RANK2 + 17) % (2**63)


def resharded_base(seed: int, step: int) -> int:
    """What a resume at ``step`` at another world size derives its new sampler streams from
    (``resharded_sampler``), so two such resumes of one run agree."""
    return seed * _STRIDE + step


def backbone(seed: int, rank: int, step: int = 0) -> int:
    """Dropout, drop-path and masking on one rank; the backbone's init uses ``seed`` itself."""
    return seed + 1 + rank + _RANK * step


def draw(seed: int, counter: int) -> int:
    """The ``counter``-th draw of a ``StepRng`` stream."""
    return (seed * _STRIDE + counter * _RANK2 + 0x5EED) % (2**63)
