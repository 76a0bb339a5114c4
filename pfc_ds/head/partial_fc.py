"""The model-parallel Partial FC head: sample rows, margin softmax, hold row gradients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pfc_ds import phases
from pfc_ds.head.adaface import AdaFace
from pfc_ds.head.bank import (
    ROW_STATES,
    STORAGE_DTYPES,
    CenterBank,
    Pending,
    RowIndex,
    init_centres,
)
from pfc_ds.head.collectives import (
    ProcessGroup,
    all_gather_no_grad,
    gather_batch,
    gather_sizes,
    world,
)
from pfc_ds.head.host_bank import DiskBank, HostBank
from pfc_ds.head.margin_softmax import margin_softmax_cross_entropy
from pfc_ds.head.margins import CombinedMarginLoss
from pfc_ds.head.names import BANKS
from pfc_ds.head.sampler import ClassSampler
from pfc_ds.head.sharding import shard_range
from pfc_ds.head.workspace import Workspace

# Backward's bound on the row gradient's entries up to which they are known finite: a quarter
# of fp32's largest value, headroom for the GEMM's rounding and the half operand's.
GRAD_BOUND = 2.0**126

_META_KEYS = ("num_classes", "world_size", "rank", "class_start", "num_local", "embedding_size")
_STATE_KEYS = ("weight", *ROW_STATES, "rng", "rounding_rng", "meta")


@dataclass
class Window:
    """One accumulation window: the rows sampled once for all its micro-batches, and their
    summed gradient.

    ``index`` (compute device) and ``bank_rows`` (the same rows where the bank keeps them) are
    the ``S`` sorted local rows; ``rows`` their values (fp32, or the storage dtype when the GEMMs
    run in it) in one workspace buffer shared by all forwards, valid once ``pending`` (an
    offloaded bank's gather) is waited for. ``labels[k]``: the global batch of micro-batch ``k``
    as local rows (anything outside ``[0, num_local)`` belongs to another rank); ``declared``:
    each micro-batch's local labels as ``prefetch`` got them; ``sizes[k]``: every rank's batch
    size. ``dL/drows`` summed over the micro-batches run so far is ``grad + coef[:, None] *
    rows`` (``grad`` fp32 ``S x D``, ``coef`` fp32 ``S``; ``row_grad()`` adds them up);
    ``active`` marks the columns in the loss (``None``: all; see ``ClassSampler``).
    """

    index: torch.Tensor
    bank_rows: RowIndex
    rows: torch.Tensor
    active: torch.Tensor | None
    labels: list[torch.Tensor]
    declared: list[torch.Tensor]
    sizes: list[list[int]]
    workspace: Workspace = field(repr=False)
    bank: CenterBank = field(repr=False)
    pending: Pending | None = None
    uses: int | None = None  # workspace uses of "rows" right after the gather; None: not shared
    forwards: int = 0
    open: bool = True  # False once the head dropped it: a late backward must not add to it
    grad: torch.Tensor | None = None
    coef: torch.Tensor | None = None
    bound: torch.Tensor | None = None  # backward's bound on |grad| (see grad_is_finite)
    bound_at: tuple[int, int] = (-1, -1)  # the (grad, coef) versions it holds for
    _finite: tuple[tuple[int, int], torch.Tensor | None] = ((-1, -1), None)  # versions, flag

    def grad_buffer(self) -> torch.Tensor:
        return self.workspace.get("grad", tuple(self.rows.shape), torch.float32)

    def coef_buffer(self) -> torch.Tensor:
        return self.workspace.get("coef", (self.rows.shape[0],), torch.float32)

    def row_grad(self) -> torch.Tensor | None:
        """``dL/drows`` (fp32 ``S x D``, a new tensor): for inspection and tests; the
        optimizers apply ``coef`` in their own pass instead."""
        if self.grad is None:
            return None
        return torch.addcmul(self.grad, self.current_rows().float(), self.coef[:, None])

    def current_rows(self) -> torch.Tensor:
        """The gathered rows, gathered again if a forward outside this window took the shared
        buffer since."""
        if self.pending is not None:
            self.rows, self.pending = self.pending.wait(), None
        if self.uses is None or self.workspace.uses("rows") == self.uses:
            return self.rows
        out = self.workspace.get("rows", tuple(self.rows.shape), self.rows.dtype)
        self.rows = self.bank.gather(self.bank_rows, out=out)
        self.uses = self.workspace.uses("rows")
        return self.rows

    def grad_is_finite(self) -> torch.Tensor:
        """A 0-dim bool on the device (never read back here), computed once per gradient
        version. Backward leaves a bound on every entry of ``grad`` (``N max|dL/dcos r|
        max|e|``, summed over the window's backwards): where it is at most ``GRAD_BOUND`` (a
        quarter of fp32's largest value) no entry can be inf or NaN, and only the ``S``
        coefficients are summed, not the ``S x D`` gradient. A gradient changed since backward
        (its version moved) is summed whole, as inf and NaN propagate through a sum (row
        gradients are far below the ~1e30 mean magnitude at which it could overflow). A finite
        gradient above the bound, which no real step comes near, reads as not finite."""
        if self.grad is None:
            return torch.ones((), dtype=torch.bool, device=self.index.device)
        version = (self.grad._version, self.coef._version)
        if self._finite[0] != version or self._finite[1] is None:
            if self.bound is not None and self.bound_at == version:
                ok = (self.bound <= GRAD_BOUND) & torch.isfinite(self.coef.sum())
            else:
                ok = torch.isfinite(self.grad.sum() + self.coef.sum())
            self._finite = (version, ok)
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
    """What the sparse optimizers update: the window's distinct rows with their summed gradient.

    ``mask`` (``None``: all) says which rows may change; ``finite`` whether all gradients are
    finite. ``rows``: the current weights of ``index`` as gathered for the forward (any dtype,
    on the compute device), or ``None`` to gather them from the bank block by block. ``full``:
    ``index`` is the whole shard in order and ``rows`` is the bank's own fp32 tensor, updated in
    place. The gradient of row ``i`` is ``grad[i] + coef[i] * weight[i]`` (see ``GradSink``).
    """

    index: RowIndex
    grad: torch.Tensor
    coef: torch.Tensor
    rows: torch.Tensor | None
    mask: torch.Tensor | None
    finite: torch.Tensor
    full: bool = False

    def blocks(self):
        """``(r0, r1)`` row ranges for the optimizer."""
        return row_blocks(len(self.index), self.grad.shape[1])

    def weight_async(
        self, r0: int, r1: int, bank: CenterBank, ws: Workspace, slot: int = 0
    ) -> Pending:
        """fp32 weights of rows ``r0:r1``: a view where they are fp32 already, else a copy in a
        block-sized workspace buffer (``slot`` of two, so a block can be read ahead)."""
        if self.rows is not None and self.rows.dtype == torch.float32:
            return Pending(None, self.rows[r0:r1])
        out = ws.get(f"weight_block{slot}", (r1 - r0, self.grad.shape[1]), torch.float32)
        if self.rows is not None:
            return Pending(None, out.copy_(self.rows[r0:r1]))
        return bank.gather_async(self.index[r0:r1], out)


class PartialFC(torch.nn.Module):
    """Class centres sharded over the ranks of ``process_group``; only sampled rows are touched.

    ``forward`` all-gathers embeddings and labels, samples this shard's rows, and returns the
    margin-softmax cross-entropy over the global batch (identical on every rank). The gradient
    that reaches ``local_embeddings`` is ``W * dL/de_local`` (see ``gather_batch``);
    the sampled rows get exactly ``dL/drows`` and wait in ``window`` for the optimizer.

    **Gradient accumulation.** ``prefetch([labels_1, ..., labels_K])`` opens a window of K
    micro-batches: their labels are gathered once and the rows sampled once, for all of them
    (every positive of the K global batches, plus negatives), then each of the K forwards uses
    those rows and every backward adds into one ``S x D`` gradient. K micro-batches of B thus
    behave exactly like one batch of K x B, and cost the memory of one. A forward without a
    window samples for its own micro-batch; a second forward whose window may still get a
    gradient, with no ``prefetch`` and no optimizer step between, raises.

    A step makes no host sync when ``even_batches`` is set (every rank passes the same batch
    size, as the trainer's loaders guarantee); otherwise the ranks exchange their sizes first.
    ``chunk`` is the number of sampled columns per block of the streamed softmax (``None``:
    from a 64 MB budget). The weights are not ``nn.Parameter``s: nothing may build a dense
    ``num_local x D`` gradient, and the head lives outside ZeRO and DDP; ``.to(device)`` moves
    the bank all the same.
    """

    def __init__(
        self,
        margin_loss: CombinedMarginLoss | AdaFace,
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
        self.margin_loss = margin_loss.to(device)  # AdaFace's statistics live beside the bank
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.world_size, self.rank = world_size, rank
        self.process_group = process_group
        self.gemm_dtype = None if gemm_dtype == torch.float32 else gemm_dtype
        self.even_batches = even_batches
        self.chunk = chunk
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
                rounding_seed=seed,
            )
        else:
            weight = init_centres(seed, self.class_start, self.num_local, embedding_size, dtype)
            where = {"row_offset": self.class_start, "seed": seed}
            if bank == "host":
                self.bank = HostBank(weight, device, momentum_dtype, **where)
            else:
                self.bank = CenterBank(weight.to(device), momentum_dtype, **where)
        self.sampler = ClassSampler(self.num_local, sample_rate, seed, rank)
        self.workspace = Workspace(device)
        self.window: Window | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.bank.weight

    @property
    def momentum(self) -> torch.Tensor | None:
        return self.bank.momentum

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    @property
    def offloaded(self) -> bool:
        """The bank keeps its rows away from the compute device (host RAM or files): a
        ``prefetch`` before the backbone's forward hides their copy."""
        return not self.bank.resident

    def window_needed(self, micro_batches: int, prefetched: bool) -> bool:
        """Whether a caller that runs ``micro_batches`` forwards per optimizer step must call
        ``prefetch`` before the first one (``prefetched``: it already did, when offloaded).
        One forward opens its own window, its labels riding with the embeddings (one
        collective fewer than a separate label gather)."""
        return micro_batches > 1 and not (prefetched and self.offloaded)

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
            self.clear_window()
            self.bank.to(device)
            self.workspace = Workspace(device)
        return self

    # ---- forward -----------------------------------------------------------------------------

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must have shape (B, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        if labels.shape[:1] != embeddings.shape[:1]:
            raise ValueError(
                f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}"
            )
        self._check_label_tensor(labels)

    @staticmethod
    def _check_label_tensor(labels: torch.Tensor) -> None:
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
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

    def _sizes(self, counts: list[int], device: torch.device) -> list[list[int]]:
        """``sizes[k][r]``: rank ``r``'s batch size in micro-batch ``k``."""
        if self.even_batches:
            return [[n] * self.world_size for n in counts]
        per_rank = gather_sizes(counts, device, self.process_group)
        return [[per_rank[r][k] for r in range(self.world_size)] for k in range(len(counts))]

    def prefetch(self, local_labels: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Open an accumulation window: sample this shard's rows for the labels of all its
        micro-batches (one tensor per micro-batch, in the order of the forwards) and start
        gathering them.

        Call it before the backbone's forward: a host or disk bank then copies the rows while
        the backbone computes. It all-gathers the labels, so every rank must call it, as
        ``forward``. The forwards that follow must get the same label tensors (or equal ones).
        """
        batches = [local_labels] if isinstance(local_labels, torch.Tensor) else list(local_labels)
        if not batches:
            raise ValueError("prefetch needs the labels of at least one micro-batch")
        for labels in batches:
            self._check_label_tensor(labels)
        if self.window is not None and self.window.grad is not None:
            raise ValueError(
                "PartialFC.prefetch: the previous window still holds row gradients; call the "
                "optimizer's step() or zero_grad() before opening the next window"
            )
        self.clear_window()
        sizes = self._sizes([b.shape[0] for b in batches], batches[0].device)
        flat = batches[0] if len(batches) == 1 else torch.cat(batches)
        totals = [sum(k[r] for k in sizes) for r in range(self.world_size)]
        gathered = all_gather_no_grad(flat.long(), totals, self.process_group)
        self._open_window(gathered, batches, sizes)

    def _open_window(
        self, gathered: torch.Tensor, batches: list[torch.Tensor], sizes: list[list[int]]
    ) -> None:
        """Sample rows for the window's gathered labels and start gathering them."""
        device = self.bank.device
        gathered = gathered.to(device)
        # Labels first: every rank sees a bad label and raises together, none hangs in a collective.
        self._check_labels(gathered)
        totals = [sum(k[r] for k in sizes) for r in range(self.world_size)]
        with phases.span("head/sample"):
            local = gathered - self.class_start
            index, active = self.sampler.sample(local)
            labels = _split_micro_batches(local, sizes, totals)
        same = self.gemm_dtype is not None and self.gemm_dtype == self.bank.weight.dtype
        row_dtype = self.bank.weight.dtype if same else torch.float32
        bank_rows = self.bank.index(index)
        whole = len(index) == self.num_local and self.bank.weight.dtype == row_dtype
        window = Window(index, bank_rows, self.bank.weight, active, labels, batches, sizes,
                        self.workspace, self.bank)  # fmt: skip
        if not (whole and self.bank.resident):  # else the bank itself: no copy
            out = self.workspace.get("rows", (len(index), self.embedding_size), row_dtype)
            with phases.span("head/gather"):
                window.pending = self.bank.gather_async(bank_rows, out)
            window.rows, window.uses = out, self.workspace.uses("rows")
        self.window = window

    def _window_for(self, local_labels: torch.Tensor) -> int | None:
        """The micro-batch of the open window that ``local_labels`` belong to, or ``None``
        when this forward opens its own window."""
        w = self.window
        if w is not None and w.forwards < len(w.declared):
            k = w.forwards
            want = w.declared[k]
            if local_labels is not want:
                if local_labels.shape != want.shape:
                    raise ValueError(
                        f"forward {k + 1} of the window got {local_labels.shape[0]} labels, "
                        f"prefetch declared {want.shape[0]}"
                    )
                torch._assert_async(
                    (local_labels.to(want.device) == want).all(),
                    "forward's labels differ from the ones prefetch declared",
                )
            return k
        if w is not None and w.grad is not None:
            raise ValueError(
                "PartialFC: another forward before the optimizer step: for gradient "
                "accumulation call head.prefetch([labels of each micro-batch]) at the start of "
                "the window (then K micro-batches act as one batch of K x B)"
            )
        return None

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Three collectives: the embeddings (with the labels, unless ``prefetch`` gathered
        them) in one all-gather, the softmax statistics in another, and the embedding
        gradient's reduce-scatter in backward."""
        self._check_inputs(local_embeddings, local_labels)
        k = self._window_for(local_labels)
        emb = local_embeddings.float()
        if k is None:  # this forward's own window: its labels ride with the embeddings
            self._check_label_tensor(local_labels)
            self.clear_window()
            sizes = self._sizes([local_labels.shape[0]], local_labels.device)
            embeddings, gathered = gather_batch(emb, local_labels, sizes[0], self.process_group)
            self._open_window(gathered, [local_labels], sizes)
            k = 0
        else:
            embeddings, _ = gather_batch(emb, None, self.window.sizes[k], self.process_group)
        w = self.window
        w.forwards += 1
        with phases.span("head/gather"):  # prefetched: only the wait is left
            rows = w.current_rows()
        target = self.sampler.targets(w.index, w.labels[k])
        embeddings = embeddings.to(self.bank.device)
        # F.normalize's own arithmetic, keeping the norms: AdaFace's statistics are those of the
        # global batch, every rank computing them from the same gathered rows (no collective).
        norms = embeddings.norm(2, 1, keepdim=True)
        row_state = self.margin_loss.row_state(norms.detach().squeeze(1))
        return margin_softmax_cross_entropy(
            embeddings / norms.clamp_min(1e-12).expand_as(embeddings),
            rows,
            target,
            self.margin_loss,
            self.process_group,
            w,
            active=w.active,
            gemm_dtype=self.gemm_dtype,
            chunk=self.chunk,
            workspace=self.workspace,
            row_state=row_state,
        )

    # ---- what the optimizers see -------------------------------------------------------------

    def grads_finite(self) -> torch.Tensor:
        """0-dim device bool: the window's row gradient is finite (local; never read here)."""
        if self.window is None:
            return torch.ones((), dtype=torch.bool, device=self.bank.device)
        return self.window.grad_is_finite()

    def row_grads(self) -> RowGrads | None:
        """The window's rows and their gradients summed over its micro-batches; ``None`` if no
        backward ran."""
        w = self.window
        if w is None or w.grad is None:
            return None
        rows = w.current_rows()
        full = rows is self.bank.weight and rows.dtype == torch.float32
        return RowGrads(w.bank_rows, w.grad, w.coef, rows, w.active, self.grads_finite(), full=full)

    def clear_window(self) -> None:
        """Forget the window (its gradient goes with it)."""
        w, self.window = self.window, None
        if w is not None:
            w.open = False
            if w.pending is not None:
                w.pending.wait()  # its copy still writes the shared buffer
            self.bank.release(w.bank_rows)

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
        to. Copy what you keep past the next step. The margin's state (AdaFace's running
        statistics, replicated on every rank) follows as ``margin_loss.<name>``."""
        self.bank.flush()
        destination[prefix + "weight"] = self.weight.detach()
        destination[prefix + "momentum"] = None  # always present (older readers expect it)
        for name, value in self.bank.states.items():
            destination[prefix + name] = value.detach()
        destination[prefix + "rng"] = self.sampler.state()
        destination[prefix + "rounding_rng"] = self.bank.rounding.state()
        destination[prefix + "meta"] = self.meta()

    def file_state(self) -> dict:
        """``state_dict()`` with the row tensors a disk bank already keeps in files given as
        ``FileRows``, so a checkpoint copies those files instead of reading the bank."""
        return {**self.state_dict(), **self.bank.file_rows()}

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Load a shard written by the same sharding; anything else raises, never re-initialises."""
        state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        own = {k: v for k, v in state.items() if "." not in k}
        missing = {"weight", "momentum", "rng", "rounding_rng", "meta"} - set(own)
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
        self._check_margin_state(state)
        self.bank.load(own["weight"], {k: own.get(k) for k in ROW_STATES})
        self.sampler.load_state(own["rng"])
        self.bank.rounding.load_state(own["rounding_rng"])
        self.clear_window()

    def _check_margin_state(self, state: dict) -> None:
        """The checkpoint's margin state must be this margin's: an AdaFace head resumed without
        its statistics would silently restart them, and a CombinedMarginLoss head has none to
        take (the margin cannot change across a resume)."""
        theirs = sorted(k for k in state if k.startswith("margin_loss."))
        mine = sorted("margin_loss." + k for k in self.margin_loss.state_dict())
        if theirs != mine:
            raise ValueError(
                f"head state_dict holds margin state {theirs or 'none'}, this head's margin "
                f"{type(self.margin_loss).__name__} has {mine or 'none'}: resume with the margin "
                "the head was trained with (AdaFace keeps its running norm statistics there)"
            )


def _split_micro_batches(
    labels: torch.Tensor, sizes: list[list[int]], totals: list[int]
) -> list[torch.Tensor]:
    """Each micro-batch's global batch from the window's labels, gathered rank by rank: rank
    ``r`` contributed its micro-batches' labels one after another (static offsets, no sync)."""
    if len(sizes) == 1:
        return [labels]
    starts = [sum(totals[:r]) for r in range(len(totals))]
    out = []
    for k, per_rank in enumerate(sizes):
        parts = []
        for r, n in enumerate(per_rank):
            lo = starts[r] + sum(sizes[j][r] for j in range(k))
            parts.append(labels[lo : lo + n])
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return out
