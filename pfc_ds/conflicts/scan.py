"""Blockwise all-pairs cosine scan over a sharded class-centre bank.

Why blockwise: a 10M x 512 bank is 10-20 GB and its similarity matrix 10^14 entries, so neither
is ever held. The rows are cut into blocks of at most ``block_rows`` rows that never straddle a
shard; a *tile* is a pair of blocks ``(i, j)``, ``i <= j``. Each tile normalises its two blocks
in fp32 on the fly (from the memory-mapped shard files, any storage dtype), multiplies them into
one ``B x B`` fp32 score block, and keeps only the pairs above the threshold. Memory is
``O(B^2 + B*D)`` plus the pairs kept, never the bank.

What is kept:

* ``topk=None``: every pair ``a < b`` with cosine above the threshold, up to ``max_pairs``; past
  the cap the highest ``max_pairs`` are kept and ``ScanResult.truncated`` says so.
* ``topk=K``: a pair is kept when ``b`` is among ``a``'s K most similar centres above the
  threshold, or ``a`` among ``b``'s. Pruning a subset of pairs to its per-row top K never drops
  a pair of the global top K, so tiles and ranks prune locally and the merge prunes once more.

Distributed: every rank of an initialised process group takes the tiles ``t`` with
``t % world == rank`` (consecutive tiles of a rank share their first block, which stays
resident), and the pairs (small) are all-gathered and merged on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_BLOCK_ROWS = 4096  # 64 MB fp32 score block: cache-friendly GEMMs, small beside any bank
DEFAULT_MAX_PAIRS = 1_000_000


@dataclass
class Bank:
    """Row shards of one class-centre matrix: ``weights[s]`` holds global rows
    ``starts[s] ... starts[s] + len(weights[s])`` (tensors may be memory-mapped, any float dtype)."""

    weights: list[torch.Tensor]
    starts: list[int]

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("the bank has no shards")
        dims = {w.shape[1] for w in self.weights}
        if len(dims) != 1 or any(w.dim() != 2 for w in self.weights):
            raise ValueError(f"shards disagree on the embedding size: {sorted(dims)}")
        for s in range(1, len(self.weights)):
            if self.starts[s] != self.starts[s - 1] + len(self.weights[s - 1]):
                raise ValueError(f"shard {s} starts at {self.starts[s]}, not after shard {s - 1}")

    @property
    def num_classes(self) -> int:
        return self.starts[-1] + len(self.weights[-1])

    @property
    def dim(self) -> int:
        return self.weights[0].shape[1]


@dataclass
class ScanResult:
    """Pairs ``a < b`` (global class ids) with their cosines, sorted by cosine descending."""

    a: torch.Tensor
    b: torch.Tensor
    cos: torch.Tensor
    truncated: bool = False  # more than max_pairs pairs were above the threshold
    stats: dict = field(default_factory=dict)

    def pairs(self) -> list[tuple[int, int, float]]:
        return list(zip(self.a.tolist(), self.b.tolist(), self.cos.tolist(), strict=True))


def blocks(bank: Bank, block_rows: int) -> list[tuple[int, int, int]]:
    """``(shard, row0, row1)`` of every row block, in global order; none straddles a shard."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    out = []
    for s, w in enumerate(bank.weights):
        out += [(s, r, min(r + block_rows, len(w))) for r in range(0, len(w), block_rows)]
    return out


def tiles(num_blocks: int) -> list[tuple[int, int]]:
    """Block pairs ``(i, j)``, ``i <= j``, row-major: consecutive tiles share block ``i``."""
    return [(i, j) for i in range(num_blocks) for j in range(i, num_blocks)]


def _normalised(bank: Bank, blk: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    s, r0, r1 = blk
    rows = bank.weights[s][r0:r1].to(device).float()  # fp16/bf16 -> fp32 block, never the bank
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _above(s: torch.Tensor, thr: float, *, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the entries of ``s`` above ``thr`` (``rows < cols`` on a diagonal
    tile). Off the diagonal, a row-max pass (reads only) picks the few rows to look into: a
    full compare-and-nonzero pass over ``B^2`` costs about as much as a D=128 GEMM."""
    if diagonal:
        rows, cols = (s > thr).nonzero(as_tuple=True)
        upper = rows < cols
        return rows[upper], cols[upper]
    hot = (s.amax(dim=1) > thr).nonzero().view(-1)
    if len(hot) == 0:
        return hot, hot
    r, cols = (s[hot] > thr).nonzero(as_tuple=True)
    return hot[r], cols


def workspace_bytes(block_rows: int, dim: int) -> int:
    """Scan memory besides the pairs: the fp32 score block and two normalised row blocks."""
    return block_rows * block_rows * 4 + 2 * block_rows * dim * 4


def _ranks_in_groups(keys: torch.Tensor) -> torch.Tensor:
    """Position of each element within its run of equal ``keys`` (``keys`` sorted)."""
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return torch.arange(len(keys), device=keys.device) - starts


def prune(
    a: torch.Tensor,
    b: torch.Tensor,
    cos: torch.Tensor,
    *,
    topk: int | None,
    max_pairs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Deduplicate and cut a pair list to the kept set; returns it sorted by cosine descending
    (ties by ``(a, b)``) and whether the ``max_pairs`` cap dropped pairs."""
    if len(a) == 0:
        return a, b, cos, False
    key = torch.stack([a, b], 1)
    key, first = _unique_rows(key)
    a, b, cos = key[:, 0], key[:, 1], cos[first]
    order = torch.sort(cos, descending=True, stable=True).indices  # (a, b) ascending already
    a, b, cos = a[order], b[order], cos[order]
    if topk is not None:
        ends = torch.stack([a, b], 1).reshape(-1)  # both classes of each pair, cosine order
        by_id = torch.sort(ends, stable=True).indices  # cosine order kept within a class
        rank = torch.empty_like(by_id)
        rank[by_id] = _ranks_in_groups(ends[by_id])
        keep = (rank < topk).view(-1, 2).any(1)
        a, b, cos = a[keep], b[keep], cos[keep]
    truncated = len(a) > max_pairs
    if truncated:
        a, b, cos = a[:max_pairs], b[:max_pairs], cos[:max_pairs]
    return a, b, cos, truncated


def _unique_rows(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ``(a, b)`` rows sorted ascending, and the index of one occurrence of each."""
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.empty(len(uniq), dtype=torch.int64, device=key.device)
    first[inverse] = torch.arange(len(key), device=key.device)
    return uniq, first


class _Pairs:
    """The running pair list: tile candidates appended, pruned whenever it doubles."""

    def __init__(self, topk: int | None, max_pairs: int) -> None:
        self.topk, self.max_pairs = topk, max_pairs
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.size = 0
        self.limit = max(1 << 20, 2 * max_pairs if topk is None else 0)
        self.truncated = False
        self.floor = -2.0  # past the cap, only pairs above the lowest kept cosine can enter

    def add(self, a: torch.Tensor, b: torch.Tensor, cos: torch.Tensor) -> None:
        if len(a):
            self.parts.append((a, b, cos))
            self.size += len(a)
            if self.size > self.limit:
                self.compact()
                self.limit = max(self.limit, 2 * self.size)

    def compact(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.parts:
            e = torch.empty(0, dtype=torch.int64)
            return e, e.clone(), torch.empty(0)
        a, b, c = (torch.cat(x) for x in zip(*self.parts, strict=True))
        a, b, c, cut = prune(a, b, c, topk=self.topk, max_pairs=self.max_pairs)
        self.truncated |= cut
        if cut:
            self.floor = max(self.floor, float(c[-1]))
        self.parts, self.size = [(a, b, c)], len(a)
        return a, b, c


def scan(
    bank: Bank,
    threshold: float,
    *,
    topk: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    max_pairs: int = DEFAULT_MAX_PAIRS,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    distributed: bool | None = None,
) -> ScanResult:
    """All pairs of ``bank`` rows with cosine above ``threshold`` (see the module docstring).

    ``distributed``: split the tiles over the ranks of ``group`` (default: when a process group
    is initialised); every rank returns the same merged result. ``device``: where the GEMMs run
    (default cuda if available, else cpu).
    """
    if not -1.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (-1, 1), got {threshold}")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if distributed else (1, 0)

    blks = blocks(bank, block_rows)
    mine = tiles(len(blks))[rank::world]
    pairs = _Pairs(topk, max_pairs)
    b_max = max(r1 - r0 for _, r0, r1 in blks)
    score = torch.empty(b_max * b_max, device=dev)  # flat: every tile's view is contiguous
    t0 = time.perf_counter()
    cur, left = -1, None
    flops, gemm_s = 0, 0.0
    for i, j in mine:
        if i != cur:
            cur, left = i, _normalised(bank, blks[i], dev)
        right = left if j == i else _normalised(bank, blks[j], dev)
        m, n = len(left), len(right)
        s = score[: m * n].view(m, n)
        t_mm = time.perf_counter()
        torch.mm(left, right.T, out=s)
        gemm_s += time.perf_counter() - t_mm  # exact on a CPU; a GPU only queues the GEMM
        flops += 2 * m * n * bank.dim
        thr = threshold if topk is not None else max(threshold, pairs.floor)
        rows, cols = _above(s, thr, diagonal=i == j)
        if len(rows):
            ga = rows + (bank.starts[blks[i][0]] + blks[i][1])
            gb = cols + (bank.starts[blks[j][0]] + blks[j][1])
            found = (ga.cpu(), gb.cpu(), s[rows, cols].cpu())
            if topk is not None and len(rows) > topk:  # a tile's own top K: a safe subset cut
                found = prune(*found, topk=topk, max_pairs=len(rows))[:3]
            pairs.add(*found)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    a, b, c = pairs.compact()
    truncated = pairs.truncated
    if distributed and world > 1:
        a, b, c, truncated = _merge(a, b, c, truncated, group, dev)
        a, b, c, cut = prune(a, b, c, topk=topk, max_pairs=max_pairs)
        truncated |= cut
    stats = {
        "tiles": len(mine),
        "tiles_total": len(blks) * (len(blks) + 1) // 2,
        "blocks": len(blks),
        "block_rows": b_max,
        "seconds": seconds,
        "gemm_flops": flops,
        "gemm_seconds": gemm_s if dev.type == "cpu" else None,
        "device": str(dev),
        "world": world,
        "workspace_bytes": workspace_bytes(b_max, bank.dim),
    }
    return ScanResult(a, b, c, truncated, stats)


def _merge(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    truncated: bool,
    group: dist.ProcessGroup | None,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """All-gather every rank's pairs (padded to the longest list) onto every rank."""
    comm = dev if dist.get_backend(group) == "nccl" else torch.device("cpu")
    world = dist.get_world_size(group)
    n = torch.tensor([len(a), int(truncated)], dtype=torch.int64, device=comm)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    longest = max(int(s[0]) for s in sizes)
    packed = torch.zeros(longest, 3, dtype=torch.float64, device=comm)  # ids < 2^53: exact
    packed[: len(a)] = torch.stack([a.double(), b.double(), c.double()], 1).to(comm)
    got = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(got, packed, group=group)
    rows = torch.cat([g[: int(s[0])] for g, s in zip(got, sizes, strict=True)]).cpu()
    any_cut = any(bool(s[1]) for s in sizes)
    return rows[:, 0].long(), rows[:, 1].long(), rows[:, 2].float(), any_cut


def bank_bytes(bank: Bank) -> int:
    return sum(w.numel() * w.element_size() for w in bank.weights)


def open_weights(weights: Sequence[torch.Tensor]) -> Bank:
    """A ``Bank`` of consecutive row shards (their class starts follow from their lengths)."""
    starts, at = [], 0
    for w in weights:
        starts.append(at)
        at += len(w)
    return Bank(list(weights), starts)
