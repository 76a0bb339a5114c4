"""A synthetic face data set that is a pure function of the global sample index.

Sample ``i`` (counted from the start of training, across epochs) has label ``h(seed, i) % C`` and
an image ``0.6 * proto(label) + 0.4 * noise(i)`` in [-1, 1], where ``proto`` (a 4x4 grid of
colours per class) and ``noise`` (per 8x8-pixel cell) are counter-based hashes of (seed, index). Nothing depends on the rank or the batch size:
micro-batch ``k`` of the run covers global indices ``[k*G, (k+1)*G)`` with ``G = b * W`` and rank
``r`` reads ``[k*G + r*b, k*G + (r+1)*b)``, so W ranks of batch b read exactly what one rank of
batch ``W*b`` reads, and 2 micro-steps of ``b`` what one step of ``2b`` reads.

The iterator has the interface of ``data_pipelines.build_loader``'s: iterate one epoch of
``(images float32 (B,3,H,W), labels int64 (B,))``, ``len()`` batches per epoch, ``reset()`` to
start the next epoch, ``state_dict()``/``load_state_dict()`` for resume, and ``num_classes``.
The state counts global samples, so a resume at a different world size continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_M32 = 0xFFFFFFFF
# A class is a coarse 4x4 colour layout; a sample adds noise on 8x8-pixel cells. Hashing every
# pixel would cost more than the demo's model and add nothing a face-like task needs.
_PROTO_GRID = 4
_NOISE_CELL = 8
_PROTO_WEIGHT = 0.6


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons) on int64 tensors holding 32-bit values; wrap-around is harmless."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _key(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per 64-bit ``index``, independent per (seed, stream)."""
    s = _hash32(torch.tensor((seed * 0x9E3779B1 + stream * 0x85EBCA77) & _M32))
    return _hash32(_hash32((index >> 32) ^ s) ^ (index & _M32))


def _uniform(keys: torch.Tensor, num: int) -> torch.Tensor:
    """``(len(keys), num)`` floats in [-1, 1), one hash per (key, position)."""
    pos = torch.arange(num, dtype=torch.int64, device=keys.device)
    bits = _hash32(keys[:, None] * 0x27D4EB2F + pos[None, :])
    return bits.to(torch.float32) * (2.0 / 2**32) - 1.0


def synthetic_samples(
    indices: torch.Tensor, *, num_classes: int, image_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, S, S)`` float32 and labels int64 of the global sample ``indices``,
    computed on the device of ``indices`` (a GPU generates its own batches)."""
    indices = indices.to(torch.int64)
    labels = _key(seed, 1, indices) % num_classes
    return render(labels, indices, image_size=image_size, seed=seed), labels


def render(
    labels: torch.Tensor, indices: torch.Tensor, *, image_size: int, seed: int
) -> torch.Tensor:
    """Images of class ``labels`` with the noise of sample ``indices`` (any int64 values)."""
    proto = _uniform(_key(seed, 2, labels), 3 * _PROTO_GRID * _PROTO_GRID)
    proto = _upsample(proto.view(-1, 3, _PROTO_GRID, _PROTO_GRID), image_size)
    grid = -(-image_size // _NOISE_CELL)
    noise = _uniform(_key(seed, 3, indices), 3 * grid * grid).view(-1, 3, grid, grid)
    return proto.mul_(_PROTO_WEIGHT).add_(_upsample(noise, image_size), alpha=1 - _PROTO_WEIGHT)


def heldout_pairs(
    num_pairs: int, *, first_class: int, image_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A verification set of the same distribution with no training class: uint8 RGB images
    ``(2P, S, S, 3)`` (rows 2i, 2i+1 form pair i) and ``issame`` ``(P,)``, alternating.

    Classes start at ``first_class`` (``data.num_classes``: never trained on) and the noise
    comes from sample indices from 2**48 on, which training never reaches.
    """
    pairs = torch.arange(num_pairs, dtype=torch.int64)
    pool = max(2, num_pairs)
    a = _key(seed, 4, pairs) % pool
    b = (a + 1 + _key(seed, 5, pairs) % (pool - 1)) % pool
    issame = pairs % 2 == 0
    labels = first_class + torch.stack([a, torch.where(issame, a, b)], 1).reshape(-1)
    images = render(
        labels, (1 << 48) + torch.arange(2 * num_pairs), image_size=image_size, seed=seed
    )
    images = images.mul(127.5).add(127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous(), issame


def _upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour blow-up of a (N, 3, g, g) grid to (N, 3, size, size)."""
    cell = -(-size // x.shape[-1])
    x = x.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)
    return x[:, :, :size, :size].contiguous()


class SyntheticFaces:
    """Rank ``rank``'s share of a deterministic synthetic stream (see the module docstring)."""

    def __init__(
        self,
        *,
        num_classes: int,
        num_images: int,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.num_classes = num_classes
        self.num_images = num_images
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.device = torch.device(device)
        self.global_batch = batch_size * world_size
        if num_images < self.global_batch:
            raise ValueError(
                f"data.num_images={num_images} is smaller than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.epoch = 0
        self.position = 0  # global samples consumed in this epoch

    def __len__(self) -> int:
        """Full global batches in one epoch (the last partial one is dropped)."""
        return self.num_images // self.global_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.position + self.global_batch <= self.num_images:
            start = self.epoch * self.num_images + self.position + self.rank * self.batch_size
            idx = torch.arange(
                start, start + self.batch_size, dtype=torch.int64, device=self.device
            )
            images, labels = synthetic_samples(
                idx, num_classes=self.num_classes, image_size=self.image_size, seed=self.seed
            )
            self.position += self.global_batch
            yield images, labels

    def reset(self) -> None:
        """Start the next epoch."""
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
