"""The model-parallel Partial FC head: sample rows, margin softmax, hold row gradients."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pfc_ds import phases
from pfc_ds.head import seeds
from pfc_ds.head.bank import ROW_STATES, STORAGE_DTYPES, CenterBank, init_centres
from pfc_ds.head.collectives import (
    ProcessGroup,
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    world,
)
from pfc_ds.head.host_bank import DiskBank, HostBank
from pfc_ds.head.margin_softmax import margin_softmax_cross_entropy
from pfc_ds.head.margins import CombinedMarginLoss
from pfc_ds.head.sampler import ClassSampler
from pfc_ds.head.sharding import shard_range
from pfc_ds.head.workspace import Workspace

BANKS = ("device", "host", "disk")

_META_KEYS = ("num_classes", "world_size", "rank", "class_start", "num_local", "embedding_size")
_STATE_KEYS = ("weight", *ROW_STATES, "rng", "rounding_rng", "meta")


@dataclass
class SampledRows:
    """Rows of one forward pass: local indices, their values, and ``dL/drows`` after backward.

    ``rows`` (fp32, or the storage dtype when the GEMMs run in it) sit in one workspace buffer
    shared by all forwards: a later forward may reuse it, and ``current_rows()`` then gathers
    them again from the bank (unchanged until the optimizer steps). Only ``grad`` (fp32) is
    kept per forward (slot ``slot``) until the optimizer consumes it. ``active`` marks the
    columns in the loss (``None``: all; see ``ClassSampler``).
    """

    index: torch.Tensor
    rows: torch.Tensor
    active: torch.Tensor | None
    slot: int
    workspace: Workspace = field(repr=False)
    bank: CenterBank = field(repr=False)
    uses: int | None = None  # workspace uses of "rows" right after the gather; None: not shared
    grad: torch.Tensor | None = None
    _finite: tuple[int, torch.Tensor | None] = (-1, None)  # (grad._version, flag)

    def grad_buffer(self) -> torch.Tensor:
        return self.workspace.get(f"grad{self.slot}", tuple(self.rows.shape), torch.float32)

    def current_rows(self) -> torch.Tensor:
        """The gathered rows, gathered again if another forward took the shared buffer since."""
        if self.uses is None or self.workspace.uses("rows") == self.uses:
            return self.rows
        out = self.workspace.get("rows", tuple(self.rows.shape), self.rows.dtype)
        self.rows, self.uses = self.bank.gather(self.index, out=out), self.workspace.uses("rows")
        return self.rows

    def grad_is_finite(self) -> torch.Tensor:
        """A 0-dim bool on the device (never read back here): one sum per gradient version, as
        inf and NaN propagate through it and row gradients are far below the ~1e30 mean
        magnitude at which an fp32 sum of S x D terms could overflow."""
        if self.grad is None:
            return torch.ones((), dtype=torch.bool, device=self.index.device)
        version = self.grad._version
        if self._finite[0] != version or self._finite[1] is None:
            self._finite = (version, torch.isfinite(self.grad.sum()))
        return self._finite[1]


# The optimizers update rows in blocks of about this many bytes of fp32 rows, so their buffers
# (weights, momentum or AdamW moments, rounding staging) are a block, not S x D, per step.
ROW_BLOCK_BYTES = 64 * 2**20


def row_blocks(num_rows: int, dim: int, block_bytes: int | None = None):
    """``(r0, r1)`` ranges of rows whose fp32 copies take about ``block_bytes`` (default
    ``ROW_BLOCK_BYTES``) each."""
    step = max(1, (block_bytes or ROW_BLOCK_BYTES) // (4 * max(dim, 1)))
    for r0 in range(0, num_rows, step):
        yield r0, min(num_rows, r0 + step)


@dataclass
class RowGrads:
    """What the sparse optimizers update: every pending row once, with its summed gradient.

    Under accumulation a row sampled by several micro-batches appears once per sampling, each
    copy carrying the same summed gradient and weight, so writing them all back is the same as
    writing one. ``mask`` (``None``: all) says which entries may change; ``finite`` whether all
    gradients are finite. ``rows``: the current weights of ``index`` as gathered for the forward
    (any dtype), or ``None`` to gather them from the bank block by block. ``full``: ``index`` is
    the whole shard in order and ``rows`` is the bank's own fp32 tensor, updated in place.
    ``distinct``: no row repeats, so blocks may be updated one after another; repeated rows
    (the union) go in one block, each copy reading the state from before any write.
    """

    index: torch.Tensor
    grad: torch.Tensor
    rows: torch.Tensor | None
    mask: torch.Tensor | None
    finite: torch.Tensor
    full: bool = False
    distinct: bool = True

    def blocks(self):
        """``(r0, r1)`` row ranges for the optimizer (one range when rows repeat)."""
        if not self.distinct:
            return [(0, len(self.index))]
        return row_blocks(len(self.index), self.grad.shape[1])

    def weight(self, r0: int, r1: int, bank: CenterBank, ws: Workspace) -> torch.Tensor:
        """fp32 weights of rows ``r0:r1``: a view where they are fp32 already, else a copy in
        a block-sized workspace buffer."""
        if self.rows is not None and self.rows.dtype == torch.float32:
            return self.rows[r0:r1]
        out = ws.get("weight_block", (r1 - r0, self.grad.shape[1]), torch.float32)
        if self.rows is not None:
            return out.copy_(self.rows[r0:r1])
        return bank.gather(self.index[r0:r1], out=out)


class PartialFC(torch.nn.Module):
    """Class centres sharded over the ranks of ``process_group``; only sampled rows are touched.

    ``forward`` all-gathers embeddings and labels, samples this shard's rows, and returns the
    margin-softmax cross-entropy over the global batch (identical on every rank). The gradient
    that reaches ``local_embeddings`` is ``W * dL/de_local`` (see ``all_gather_with_grad``);
    the sampled rows get exactly ``dL/drows`` and wait in ``pending`` for the optimizer.

    A step makes no host sync when ``even_batches`` is set (every rank passes the same batch
    size, as the trainer's loaders guarantee); otherwise the ranks exchange their sizes first.
    ``chunk`` is the number of sampled columns per block of the streamed softmax (``None``:
    from a 64 MB budget). The weights are not ``nn.Parameter``s: nothing may build a dense
    ``num_local x D`` gradient, and the head lives outside ZeRO and DDP; ``.to(device)`` moves
    the bank all the same.
    """

    def __init__(
        self,
        margin_loss: CombinedMarginLoss,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        dtype: torch.dtype = torch.float32,
        process_group: ProcessGroup = None,
        seed: int = 0,
        momentum_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        gemm_dtype: torch.dtype | None = None,
        *,
        even_batches: bool = False,
        chunk: int | None = None,
        bank: str = "device",
        bank_path: str | None = None,
    ) -> None:
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype}")
        if gemm_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"gemm_dtype must be None, float32, float16 or bfloat16, got {gemm_dtype}"
            )
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1 or None, got {chunk}")
        if bank not in BANKS:
            raise ValueError(f"bank must be one of {BANKS}, got {bank!r}")
        world_size, rank = world(process_group)
        self.class_start, self.num_local = shard_range(num_classes, world_size, rank)
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else "cpu"
            )
        device = torch.device(device)
        self.margin_loss = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.world_size, self.rank = world_size, rank
        self.process_group = process_group
        self.gemm_dtype = None if gemm_dtype == torch.float32 else gemm_dtype
        self.even_batches = even_batches
        self.chunk = chunk
        rounding = seeds.rounding(seed, rank)
        if bank == "disk":
            if bank_path is None:
                raise ValueError("a disk bank needs bank_path (a folder for its files)")
            self.bank = DiskBank(
                bank_path,
                seed=seed,
                class_start=self.class_start,
                num_local=self.num_local,
                embedding_size=embedding_size,
                dtype=dtype,
                device=device,
                rank=rank,
                world_size=world_size,
                momentum_dtype=momentum_dtype,
                rounding_seed=rounding,
            )
        else:
            weight = init_centres(seed, self.class_start, self.num_local, embedding_size, dtype)
            if bank == "host":
                self.bank = HostBank(weight, device, momentum_dtype, seed=rounding)
            else:
                self.bank = CenterBank(weight.to(device), momentum_dtype, seed=rounding)
        self._prefetched = None
        self.sampler = ClassSampler(self.num_local, sample_rate, seed, rank)
        self.workspace = Workspace(device)
        self.pending: list[SampledRows] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.bank.weight

    @property
    def momentum(self) -> torch.Tensor | None:
        return self.bank.momentum

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"shard=[{self.class_start}, {self.class_start + self.num_local}) of rank "
            f"{self.rank}/{self.world_size}, sample_rate={self.sample_rate}, "
            f"dtype={self.weight.dtype}"
        )

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.cpu()`` move the bank (dtype casts do not apply to it)."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.bank.device)).device
        if device != self.bank.device:
            self.bank.to(device)
            self.workspace = Workspace(device)
            self.pending.clear()
        return self

    # ---- forward -----------------------------------------------------------------------------

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape (B, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor, got {labels.dtype} "
                "(float labels silently give a constant loss, insightface #1437)"
            )

    def _check_labels(self, labels: torch.Tensor) -> None:
        """On the device: a GPU stops at a device-side assert; a CPU raises here at once."""
        bad = (labels < 0) | (labels >= self.num_classes)
        try:
            torch._assert_async(~bad.any(), f"a label is outside [0, {self.num_classes})")
        except RuntimeError:  # the CPU's synchronous assert: name the value (error path only)
            value = int(labels[bad][0])
            raise ValueError(
                f"label {value} is outside [0, num_classes={self.num_classes}) "
                f"({int(bad.sum())} bad label(s) in the global batch)"
            ) from None

    def _sizes(self, n: int, device: torch.device) -> list[int]:
        if self.even_batches:
            return [n] * self.world_size
        return gather_sizes(n, device, self.process_group)

    def _sample(self, local_labels: torch.Tensor, sizes: list[int]):
        """All-gather and check the labels, then sample this shard's rows; start their gather.

        Returns ``(index, target, active, rows, pending)``: ``pending`` is the running gather
        of a host or disk bank (``None`` once ``rows`` hold the values).
        """
        group, device = self.process_group, self.bank.device
        # Labels first: every rank sees a bad label and raises together, none hangs in a collective.
        labels = all_gather_no_grad(local_labels.long(), sizes, group).to(device)
        self._check_labels(labels)
        with phases.span("head/sample"):
            local = labels - self.class_start
            if not self.bank.resident:  # the rows are indexed where they live
                local = local.to(self.bank.storage)
            index, target, active = self.sampler.sample(local)
            target = target.to(device)
            active = None if active is None else active.to(device)
        same = self.gemm_dtype is not None and self.gemm_dtype == self.bank.weight.dtype
        row_dtype = self.bank.weight.dtype if same else torch.float32
        whole = len(index) == self.num_local and self.bank.weight.dtype == row_dtype
        if whole and self.bank.resident:
            return index, target, active, self.bank.weight, None  # no copy
        out = self.workspace.get("rows", (len(index), self.embedding_size), row_dtype)
        if self.bank.resident:
            with phases.span("head/gather"):
                return index, target, active, self.bank.gather(index, out=out), None
        return index, target, active, out, self.bank.gather_async(index, out)

    def prefetch(self, local_labels: torch.Tensor) -> None:
        """Sample this step's rows and start gathering them now, from the labels alone.

        Call it before the backbone's forward with the labels ``forward`` will get (the same
        tensor): a host or disk bank then copies the rows while the backbone computes. It runs
        the labels' all-gather, so every rank must call it, as ``forward``.
        """
        if local_labels.dim() != 1 or local_labels.dtype.is_floating_point:
            return  # forward raises the clear error
        sizes = self._sizes(local_labels.shape[0], local_labels.device)
        self._prefetched = (local_labels, sizes, self._sample(local_labels, sizes))

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(local_embeddings, local_labels)
        group, device = self.process_group, self.bank.device
        ready, self._prefetched = self._prefetched, None
        if ready is not None and ready[0] is local_labels:  # sizes and sample from prefetch
            sizes, (index, target, active, rows, pending) = ready[1], ready[2]
        else:
            sizes = self._sizes(local_labels.shape[0], local_labels.device)
            index, target, active, rows, pending = self._sample(local_labels, sizes)
        embeddings = all_gather_with_grad(local_embeddings.float(), sizes, group).to(device)
        if pending is not None:
            with phases.span("head/gather"):  # prefetched: only the wait is left
                rows = pending.wait()
        slot = len(self.pending)
        uses = None if rows is self.bank.weight else self.workspace.uses("rows")
        sampled = SampledRows(index, rows, active, slot, self.workspace, self.bank, uses)
        self.pending.append(sampled)
        return margin_softmax_cross_entropy(
            F.normalize(embeddings, dim=1),
            rows,
            target,
            self.margin_loss,
            group,
            sampled,
            active=active,
            gemm_dtype=self.gemm_dtype,
            chunk=self.chunk,
            workspace=self.workspace,
        )

    # ---- what the optimizers see -------------------------------------------------------------

    def grads_finite(self) -> torch.Tensor:
        """0-dim device bool: every pending row gradient is finite (local; never read here)."""
        flag = torch.ones((), dtype=torch.bool, device=self.bank.device)
        for p in self.pending:
            flag = flag & p.grad_is_finite()
        return flag

    def row_grads(self) -> RowGrads | None:
        """The pending rows and their gradients, summed over micro-batches; ``None`` if none.

        Static shapes throughout (no ``unique``): a sort groups repeated rows.
        """
        pending = [p for p in self.pending if p.grad is not None]
        if not pending:
            return None
        finite = self.grads_finite()
        dim, ws = self.embedding_size, self.workspace
        if len(pending) == 1:
            p = pending[0]
            full = p.rows is self.bank.weight and p.rows.dtype == torch.float32
            return RowGrads(p.index, p.grad, p.current_rows(), p.active, finite, full=full)
        index = torch.cat([p.index for p in pending])
        order = index.argsort(stable=True)
        ranked = index[order]
        first = torch.ones_like(ranked, dtype=torch.bool)
        first[1:] = ranked[1:] != ranked[:-1]
        group = torch.empty_like(order)
        group[order] = first.long().cumsum(0) - 1  # each entry's distinct row, in sorted order
        total = ws.get("union_sum", (len(index), dim), torch.float32).zero_()
        total.index_add_(0, group, torch.cat([p.grad for p in pending]))
        grad = ws.get("union_grad", (len(index), dim), torch.float32)
        torch.index_select(total, 0, group, out=grad)
        # Every copy of a row reads the weight as it was before any write: one block.
        weight = self.bank.gather(index, out=ws.get("union_rows", grad.shape, torch.float32))
        mask = None
        if any(p.active is not None for p in pending):
            act = torch.cat(
                [
                    p.active if p.active is not None else torch.ones_like(p.index, dtype=torch.bool)
                    for p in pending
                ]
            )
            any_act = torch.zeros_like(index).scatter_reduce_(0, group, act.long(), "amax")
            mask = any_act[group].bool()
        return RowGrads(index, grad, weight, mask, finite, distinct=False)

    def clear_pending(self) -> None:
        self.pending.clear()

    def memory(self) -> dict[str, int]:
        """Bytes held between steps: ``bank`` (weights), ``optimizer_state`` (row states) and
        ``workspace`` (the per-step row buffers, staging and the sampler's full-shard index)."""
        parts = self.bank.nbytes()
        full_index = self.sampler._all
        extra = 0 if full_index is None else full_index.numel() * full_index.element_size()
        return {
            "bank": parts["bank"],
            "optimizer_state": parts["optimizer_state"],
            "workspace": self.workspace.nbytes() + parts["staging"] + extra,
        }

    # ---- state -------------------------------------------------------------------------------

    def meta(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in _META_KEYS}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """This rank's shard as live references (no copy of the bank): weight, optimizer row
        states (``momentum``, AdamW's moments and steps), RNG states and the sharding it belongs
        to. Copy what you keep past the next step."""
        self.bank.flush()
        destination[prefix + "weight"] = self.weight.detach()
        destination[prefix + "momentum"] = None  # always present (older readers expect it)
        for name, value in self.bank.states.items():
            destination[prefix + name] = value.detach()
        destination[prefix + "rng"] = self.sampler.state()
        destination[prefix + "rounding_rng"] = self.bank.rounding.state()
        destination[prefix + "meta"] = self.meta()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Load a shard written by the same sharding; anything else raises, never re-initialises.

        ``rounding_rng`` is optional (resharded shards re-seed it).
        """
        state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        own = {k: v for k, v in state.items() if "." not in k}
        missing = {"weight", "momentum", "rng", "meta"} - set(own)
        if missing:
            raise ValueError(f"head state_dict lacks key(s) {sorted(missing)}")
        unexpected_keys.extend(prefix + k for k in own if k not in _STATE_KEYS)
        mine, theirs = self.meta(), own["meta"]
        wrong = [
            f"{k}: checkpoint {theirs.get(k)} != head {mine[k]}"
            for k in _META_KEYS
            if theirs.get(k) != mine[k]
        ]
        if wrong:
            raise ValueError(
                "head shard does not match this head's sharding ("
                + "; ".join(wrong)
                + "); reshard it with `python -m pfc_ds.tools.reshard`"
            )
        self.bank.load(own["weight"], {k: own.get(k) for k in ROW_STATES})
        self.sampler.load_state(own["rng"])
        if own.get("rounding_rng") is not None:
            self.bank.rounding.load_state(own["rounding_rng"])
        self.pending.clear()
