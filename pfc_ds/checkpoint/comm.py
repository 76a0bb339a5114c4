"""Host-side agreement for checkpoints: every rank sees the same list, so every rank takes the
same branch (write or give up, resume this tag or the previous one) and none waits alone."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(world size, rank)`` of the default group, ``(1, 0)`` without one."""
    return (dist.get_world_size(), dist.get_rank()) if initialized() else (1, 0)


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)


def gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj`` in rank order (a host-side collective)."""
    if not initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
