"""Move head shards between world sizes: every global class row keeps its weight and its
optimizer states (SGD's momentum, AdamW's moments and per-row step counts).

Pure torch over the head's ``state_dict()`` format (``weight``, the row states, ``rng``, ``meta``).
Rows are copied, never recomputed, so a reshard is bit-exact and ``reshard(reshard(s, 3), 2)``
equals ``reshard(s, 2)``.

The sampler RNG cannot be carried over: W old generators do not map onto W' new ones. Each new
rank's generator is re-seeded from ``(seed, dst_world, dst_rank)`` (see ``resharded_rng``), so a
resharded run is deterministic for a given seed; the trainer passes a seed derived from its
config seed and the step of the checkpoint. With ``sample_rate = 1`` the RNG is never drawn from
and nothing changes at all. The rounding state ``rounding_rng`` (the run's seed and the
optimizer step that key half-precision stochastic rounding) does not depend on the sharding and
is kept. A reshard to the *same* world size keeps every RNG state. The margin's state
(``margin_loss.*``: AdaFace's running norm statistics) is replicated, identical on every rank, so
it is copied as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pfc_ds.head import seeds
from pfc_ds.head.bank import ROW_STATES
from pfc_ds.head.sharding import overlaps, shard_range

Shard = dict
MARGIN_PREFIX = "margin_loss."  # the margin's state in a shard (replicated on every rank)


def shard_meta(shards: Sequence[Shard]) -> tuple[int, int, int]:
    """``(num_classes, embedding_size, world_size)`` of a complete, consistent set of shards."""
    if not shards:
        raise ValueError("no head shards given")
    metas = [s["meta"] for s in shards]
    num_classes, emb, world = (metas[0][k] for k in ("num_classes", "embedding_size", "world_size"))
    if len(shards) != world:
        raise ValueError(f"got {len(shards)} shard(s) of a {world}-rank head")
    for rank, meta in enumerate(metas):
        start, num = shard_range(num_classes, world, rank)
        want = {
            "num_classes": num_classes,
            "embedding_size": emb,
            "world_size": world,
            "rank": rank,
            "class_start": start,
            "num_local": num,
        }
        wrong = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(f"shard {rank} does not fit a {world}-rank head: {wrong}, want {want}")
    return num_classes, emb, world


def resharded_rng(seed: int, dst_world: int, dst_rank: int) -> torch.Tensor:
    """Sampler RNG state (a ``StepRng``'s) of ``dst_rank`` after a reshard to ``dst_world``."""
    return torch.tensor([seeds.resharded_sampler(seed, dst_world, dst_rank), 0], dtype=torch.int64)


def reshard_shard(
    load: Callable[[int], Shard],
    *,
    num_classes: int,
    embedding_size: int,
    src_world: int,
    dst_world: int,
    dst_rank: int,
    seed: int = 0,
) -> Shard:
    """Build ``dst_rank``'s shard of a ``dst_world`` split, loading only overlapping sources.

    ``load(src_rank)`` returns that source shard (it may memory-map it; only the overlapping rows
    are copied). Rows keep their storage dtype; a row state is ``None`` (or absent) only if it
    is in every overlapping source, otherwise missing rows are zeros, which is what an optimizer
    holds for a row never updated.
    """
    _, num = shard_range(num_classes, dst_world, dst_rank)
    pieces = [
        (load(src), src_rows, dst_rows)
        for src, src_rows, dst_rows in overlaps(num_classes, src_world, dst_world, dst_rank)
    ]
    first = pieces[0][0]
    weight = torch.empty(num, embedding_size, dtype=first["weight"].dtype)
    states: dict[str, torch.Tensor | None] = {"momentum": None}
    for name in ROW_STATES:
        have = [p[0][name] for p in pieces if p[0].get(name) is not None]
        if have:
            states[name] = torch.zeros((num, *have[0].shape[1:]), dtype=have[0].dtype)
    for shard, src_rows, dst_rows in pieces:
        if tuple(shard["weight"].shape[1:]) != (embedding_size,):
            raise ValueError(f"shard weight has shape {tuple(shard['weight'].shape)}")
        weight[dst_rows] = shard["weight"][src_rows].to(weight.dtype)
        for name, out in states.items():
            if out is not None and shard.get(name) is not None:
                out[dst_rows] = shard[name][src_rows].to(out.dtype)
    return {
        "weight": weight,
        **states,
        **shard_header(first, num_classes, embedding_size, src_world, dst_world, dst_rank, seed),
    }


def shard_header(
    first: Shard,
    num_classes: int,
    embedding_size: int,
    src_world: int,
    dst_world: int,
    dst_rank: int,
    seed: int,
) -> Shard:
    """The non-row keys of ``dst_rank``'s shard: sampler RNG (kept when the world size is,
    re-seeded otherwise), the rounding state and the margin's state (kept: the same on every
    rank), and the sharding meta. ``first`` is the first overlapping source shard."""
    start, num = shard_range(num_classes, dst_world, dst_rank)
    extra = {k: v.clone() for k, v in first.items() if k.startswith(MARGIN_PREFIX)}
    if first.get("rounding_rng") is not None:
        extra["rounding_rng"] = first["rounding_rng"].clone()
    if src_world == dst_world:
        rng = first["rng"].clone()
    else:
        rng = resharded_rng(seed, dst_world, dst_rank)
    meta = {
        "num_classes": num_classes,
        "world_size": dst_world,
        "rank": dst_rank,
        "class_start": start,
        "num_local": num,
        "embedding_size": embedding_size,
    }
    return {"rng": rng, "meta": meta, **extra}


def reshard(shards: Sequence[Shard], dst_world: int, *, seed: int = 0) -> list[Shard]:
    """All shards of a ``dst_world`` split, from a complete set of source shards."""
    num_classes, emb, src_world = shard_meta(shards)
    return [
        reshard_shard(
            shards.__getitem__,
            num_classes=num_classes,
            embedding_size=emb,
            src_world=src_world,
            dst_world=dst_world,
            dst_rank=rank,
            seed=seed,
        )
        for rank in range(dst_world)
    ]


def consolidate(shards: Sequence[Shard]) -> Shard:
    """The whole head as one shard (``world_size`` 1): full ``weight`` and row states."""
    return reshard(shards, 1)[0]
