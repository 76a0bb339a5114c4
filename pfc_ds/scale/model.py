"""Memory model of one rank: bytes per shard row, per sampled row and per backbone parameter.

Each term follows a buffer of the code as it is (named beside it), so a change there shows up
as a model that no longer matches ``pfc_ds.scale``'s measurements (and ``tests/test_scale.py``
compares the head terms with the live buffers exactly). The model is affine in the id count for
a fixed sample rate, which is what makes "the largest id count that fits" a bisection.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

from pfc_ds.head import bank as _bank
from pfc_ds.head import partial_fc as _partial_fc
from pfc_ds.head.margin_softmax import chunk_size
from pfc_ds.head.names import DTYPE_BYTES
from pfc_ds.head.rounding import scratch_elements
from pfc_ds.head.sampler import ClassSampler
from pfc_ds.head.sharding import shard_range

MB = 2**20

# RSS of a rank before its bank exists (torch, gloo and pfc_ds loaded), measured by the sweep's
# workers on this CPU: 222 MB (``runtime_mb`` in every record; measured points use their own).
# A GPU's CUDA context and NCCL buffers lie outside ``max_memory_allocated``: the ``--model``
# mode's ``--reserve-gb`` covers them.
CPU_RUNTIME_MB = 222.0


@dataclass
class HeadSpec:
    """One head configuration of one run (all ranks alike)."""

    ids: int
    world_size: int = 1
    embedding_size: int = 512
    sample_rate: float = 0.1
    batch_size: int = 128  # per rank
    dtype: str = "fp16"  # centre storage
    momentum_dtype: str | None = None  # None: the storage dtype
    gemm_dtype: str | None = None  # None: fp32 GEMMs on fp32 rows
    optimizer: str = "sgd"  # sgd | adamw
    chunk: int | None = None
    bank: str = "device"  # device | host | disk: where bank and row states live
    rank: int = 0  # the largest shard is rank 0's
    grad_accum: int = 1  # micro-batches per optimizer step: one sample for all of them
    device: str = "cuda"  # where the head computes (a CPU rounds in smaller passes)
    # On a CPU: SparseSGD runs its compiled row kernel (``row_kernels``), which writes a device
    # bank directly and needs no momentum block; False where it cannot be built.
    cpu_kernel: bool = True

    @property
    def num_local(self) -> int:
        return shard_range(self.ids, self.world_size, self.rank)[1]

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def sampled(self) -> int:
        """``ClassSampler.size`` of the accumulation window's labels: the static number of rows
        an optimizer step gathers (once, for all its micro-batches)."""
        return ClassSampler.static_size(
            self.num_local, self.sample_rate, self.global_batch * self.grad_accum
        )


def head_bytes(h: HeadSpec) -> dict[str, int]:
    """Bytes of one rank's head: ``bank``, ``optimizer_state``, ``workspace`` (persistent
    per-step buffers) and ``transient`` (freed within the step).

    Gradient accumulation adds nothing here but a larger ``S`` when the window's positives
    outnumber ``num_sample``: the K micro-batches of a window share one sample, one row buffer
    and one row gradient.
    """
    n, s, d, nb = h.num_local, h.sampled, h.embedding_size, h.global_batch
    store = DTYPE_BYTES[h.dtype]
    mom = DTYPE_BYTES[h.momentum_dtype or h.dtype]
    row = store if h.gemm_dtype == h.dtype else 4  # PartialFC.prefetch's row dtype
    whole = s == n and row == store  # the forward reads the bank itself, no gathered copy
    full = whole and store == 4  # ... and SparseSGD updates it in place
    half_state = mom != 4
    bank = n * d * store
    # SGD: momentum; AdamW: exp_avg, exp_avg_sq and steps (int32).
    states = n * d * mom if h.optimizer == "sgd" else n * (2 * d * mom + 4)

    # The optimizers work through blocks of rows (partial_fc.ROW_BLOCK_BYTES of fp32); an
    # offloaded bank reads the next block while one is updated (two buffers per tensor). A
    # dtype-changing gather stages bank.GATHER_BLOCK elements at a time.
    blk = min(s, max(1, _partial_fc.ROW_BLOCK_BYTES // (4 * d)))
    slots = 1 if h.bank == "device" else 2
    staged = max(1, _bank.GATHER_BLOCK // d)
    ws = s * d * 4 + s * 4  # "grad" and "coef": dL/drows of the window (Window.grad_buffer)
    if not whole:
        ws += s * d * row  # "rows": the gathered rows (PartialFC.prefetch)
    ws += slots * blk * d * 4 if row != 4 else 0  # "weight_block{slot}": fp32 copies of half rows
    # Bank staging: "gather" (the forward's half rows, the optimizer's half states; a device
    # bank's), "store" (stochastically rounded rows) and "rounding_bits" (their int32 bits).
    # SparseSGD's compiled CPU kernel reads and writes (and rounds) a device bank's rows itself:
    # no momentum block, no staging for its states, no rounding buffers.
    direct = h.optimizer == "sgd" and h.device == "cpu" and h.cpu_kernel and h.bank == "device"
    if h.bank == "device":
        gather_rows = max(
            min(s, staged) if not whole and row != store else 0,
            min(blk, staged) if half_state and not full and not direct else 0,
        )
        ws += gather_rows * d * 2
    rounds = (store != 4 or half_state) and not full and not direct
    ws += blk * d * 2 if rounds else 0
    ws += scratch_elements(blk, d, h.device) * 4 if rounds else 0
    if h.optimizer == "sgd":
        ws += 0 if full or direct else slots * blk * d * 4  # "momentum{slot}" (SparseSGD)
    else:  # "exp_avg{slot}", "exp_avg_sq{slot}", "steps{slot}", "adam_denom"
        ws += slots * (2 * blk * d * 4 + blk * 4) + blk * d * 4
    chunk = h.chunk or chunk_size(nb, s)
    ws += 2 * nb * min(chunk, s) * 4  # "block", "block_grad" (margin_softmax)
    if h.gemm_dtype in ("fp16", "bf16"):
        ws += nb * min(chunk, s) * 2  # "block_half": the backward's scaled half operand
    ws += n * 8 if s == n else 0  # the sampler's arange(num_local), kept for full-shard steps

    # Freed within the step: embeddings (fp32, gathered), index/targets, the inverse norms,
    # the sampler's draws (sparse path: ~6 int64 per draw) or keys over the shard (dense path).
    want = s + nb * h.grad_accum
    if 2 * s > n - nb * h.grad_accum:
        sampler = n * 4 + s * 24
    else:
        draws = int(-n * math.log1p(-min(want / n, 1 - 1e-9))) + 10 * math.isqrt(want) + 64
        sampler = draws * 48
    transient = 3 * nb * d * 4 + s * (8 + 4) + sampler
    return {"bank": bank, "optimizer_state": states, "workspace": ws, "transient": transient}


@dataclass
class BackboneSpec:
    """The backbone half of a training step (``name`` as in ``pfc_ds.backbones``)."""

    name: str
    embedding_size: int = 512
    image_size: int = 112
    precision: str = "fp16"  # fp32 | fp16 | bf16
    zero_stage: int = 0
    optimizer: str = "sgd"  # sgd | adamw
    batch_size: int = 128  # per rank
    world_size: int = 1


@cache
def backbone_profile(name: str, embedding_size: int, image_size: int) -> tuple[int, int]:
    """(parameters, fp32 bytes of the tensors autograd saves for backward per image).

    The saved tensors are counted by ``saved_tensors_hooks`` on a real fp32 forward of two
    images: what backward keeps alive, i.e. the activation memory at the peak of a step.
    """
    import torch

    from pfc_ds.backbones import get_backbone

    model = get_backbone(name, embedding_size).train()
    params = sum(p.numel() for p in model.parameters())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights are counted as parameters
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(2, 3, image_size, image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return params, sum(seen.values()) // 2


def backbone_bytes(b: BackboneSpec) -> dict[str, int]:
    """Bytes of one rank's backbone by DeepSpeed's ZeRO partitioning: half-precision params
    and grads (fp32 when training in fp32), fp32 masters (half precision only) and optimizer
    state, each divided by W from the stage that partitions it; activations per image."""
    params, act_per_image = backbone_profile(b.name, b.embedding_size, b.image_size)
    half = b.precision != "fp32"
    w = b.world_size
    p_bytes = params * (2 if half else 4)
    g_bytes = params * (2 if half else 4)
    master = params * 4 if half else 0
    opt = params * (4 if b.optimizer == "sgd" else 8)
    stage = b.zero_stage
    return {
        "params": p_bytes // (w if stage >= 3 else 1),
        "grads": g_bytes // (w if stage >= 2 else 1),
        "optimizer_state": (master + opt) // (w if stage >= 1 else 1),
        "activations": act_per_image * b.batch_size // (2 if half else 1),
    }


def predict(
    head: HeadSpec,
    backbone: BackboneSpec | None = None,
    *,
    device: str = "cpu",
    runtime_mb: float | None = None,
) -> dict[str, float]:
    """Predicted peak MB of the busiest rank, by part, and its ``total``.

    ``runtime_mb``: what a process holds before the bank (CPU: ``CPU_RUNTIME_MB``; GPU: 0, as
    peak allocated memory excludes the CUDA context).
    """
    parts = {f"head_{k}": v / MB for k, v in head_bytes(head).items()}
    if head.bank != "device":  # bank and row states live elsewhere (see ``placement``)
        parts["head_bank"] = parts["head_optimizer_state"] = 0.0
    if backbone is not None:
        parts.update({f"backbone_{k}": v / MB for k, v in backbone_bytes(backbone).items()})
    if runtime_mb is None:
        runtime_mb = CPU_RUNTIME_MB if device == "cpu" else 0.0
    parts["runtime"] = runtime_mb
    parts["total"] = sum(parts.values())
    return parts


def placement(head: HeadSpec) -> dict[str, float]:
    """Where an offloaded bank's bytes are, per rank (MB), and what a step moves.

    ``host_mb``: RAM holding bank and row states (host bank: page-locked in place, exactly its
    bytes; a disk bank needs none: the page cache is optional); ``staging_mb``: the pinned
    buffers of the copies (the index, the forward's rows, two blocks of optimizer reads and two
    of writes in flight: an upper bound of what the pool settles at); ``disk_mb``: the disk
    bank's files; ``moved_mb``: per step, the sampled rows and their states gathered to the
    device and written back.
    """
    b = head_bytes(head)
    held = (b["bank"] + b["optimizer_state"]) / MB
    rows = head.sampled * head.embedding_size
    store = DTYPE_BYTES[head.dtype]
    mom = DTYPE_BYTES[head.momentum_dtype or head.dtype]
    states = 1 if head.optimizer == "sgd" else 2
    moved = rows * (2 * store + 2 * states * mom) / MB  # rows in and out, states in and out
    blk = min(head.sampled, max(1, _partial_fc.ROW_BLOCK_BYTES // (4 * head.embedding_size)))
    block = blk * head.embedding_size
    staging = head.sampled * 8 + rows * store  # the index, the forward's rows
    staging += 2 * block * states * mom + 2 * block * (store + states * mom)
    from pfc_ds.head import host_bank

    # A disk bank's resident pages: one init chunk (drawn and mapped) or one file window.
    chunk = min(head.num_local, host_bank._INIT_CHUNK_ROWS) * head.embedding_size * store
    resident = max(2 * chunk, 2 * host_bank._WINDOW_BYTES) / MB
    offloaded = head.bank != "device"
    return {
        "host_mb": held if head.bank == "host" else 0.0,
        "staging_mb": staging / MB if offloaded else 0.0,
        "disk_mb": held if head.bank == "disk" else 0.0,
        "resident_mb": resident if head.bank == "disk" else 0.0,
        "moved_mb": moved if offloaded else 0.0,
    }


def max_ids(
    head: HeadSpec,
    budget_mb: float,
    backbone: BackboneSpec | None = None,
    *,
    device: str = "cpu",
    runtime_mb: float | None = None,
    host_mb_per_rank: float = float("inf"),
    disk_mb_per_rank: float = float("inf"),
) -> int:
    """The largest id count whose predicted peak per rank fits ``budget_mb`` (0 if none), and
    whose offloaded bank fits the host RAM or disk share of a rank."""

    def fits(ids: int) -> bool:
        h = HeadSpec(**{**asdict(head), "ids": ids})
        if predict(h, backbone, device=device, runtime_mb=runtime_mb)["total"] > budget_mb:
            return False
        where = placement(h)
        host = where["host_mb"] + where["staging_mb"]
        return host <= host_mb_per_rank and where["disk_mb"] <= disk_mb_per_rank

    lo, hi = 0, head.world_size
    if not fits(hi):
        return 0
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 10_000):  # 0.01 % is precision enough for a plan
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


__all__ = [
    "BackboneSpec",
    "HeadSpec",
    "backbone_bytes",
    "head_bytes",
    "max_ids",
    "placement",
    "predict",
]
