"""Which global class rows each rank owns.

The split is insightface's (the first ``C % W`` ranks get one extra row), so head shards written by
either code base line up row for row, and resharding only needs these pure functions.
"""

from __future__ import annotations


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Return ``(class_start, num_local)`` of ``rank`` in a ``world_size``-way split."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} < world_size={world_size}: every rank needs at least one class"
        )
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def overlaps(
    num_classes: int, src_world: int, dst_world: int, dst_rank: int
) -> list[tuple[int, slice, slice]]:
    """Pieces of the source shards that make up ``dst_rank``'s shard of a ``dst_world`` split.

    Returns ``(src_rank, src_rows, dst_rows)`` triples with local row slices, in global order.
    """
    dst_start, dst_len = shard_range(num_classes, dst_world, dst_rank)
    dst_end = dst_start + dst_len
    pieces = []
    for src_rank in range(src_world):
        src_start, src_len = shard_range(num_classes, src_world, src_rank)
        lo, hi = max(src_start, dst_start), min(src_start + src_len, dst_end)
        if lo < hi:
            pieces.append(
                (
                    src_rank,
                    slice(lo - src_start, hi - src_start),
                    slice(lo - dst_start, hi - dst_start),
                )
            )
    return pieces
