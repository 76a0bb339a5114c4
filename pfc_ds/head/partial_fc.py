"""The model-parallel Partial FC head: sample rows, margin softmax, hold row gradients."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pfc_ds.head import seeds
from pfc_ds.head.bank import STORAGE_DTYPES, CenterBank, init_centres
from pfc_ds.head.collectives import (
    ProcessGroup,
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    world,
)
from pfc_ds.head.cosine import sampled_cosine
from pfc_ds.head.margin_softmax import margin_softmax_cross_entropy
from pfc_ds.head.margins import CombinedMarginLoss
from pfc_ds.head.sampler import ClassSampler
from pfc_ds.head.sharding import shard_range
from pfc_ds.head.workspace import Workspace

_META_KEYS = ("num_classes", "world_size", "rank", "class_start", "num_local", "embedding_size")


@dataclass
class SampledRows:
    """Rows of one forward pass: local indices, their fp32 values, and ``dL/drows`` after backward.

    ``rows`` and ``grad`` live in the head's workspace (slot ``slot``) until ``zero_grad``.
    """

    index: torch.Tensor
    rows: torch.Tensor
    slot: int
    workspace: Workspace = field(repr=False)
    grad: torch.Tensor | None = None
    _finite: tuple[int, bool] = (-1, True)  # (grad._version it was checked at, result)

    def grad_buffer(self) -> torch.Tensor:
        return self.workspace.get(f"grad{self.slot}", tuple(self.rows.shape), torch.float32)

    def grad_is_finite(self) -> bool:
        """One sum per gradient version: inf and NaN propagate through it, and row gradients are
        far below the ~1e30 mean magnitude at which an fp32 sum of S x D terms could overflow."""
        if self.grad is None:
            return True
        version = self.grad._version
        if self._finite[0] != version:
            self._finite = (version, bool(torch.isfinite(self.grad.sum())))
        return self._finite[1]


class PartialFC(torch.nn.Module):
    """Class centres sharded over the ranks of ``process_group``; only sampled rows are touched.

    ``forward`` all-gathers embeddings and labels, samples this shard's rows, and returns the
    margin-softmax cross-entropy over the global batch (identical on every rank). The gradient
    that reaches ``local_embeddings`` is ``W * dL/de_local`` (see ``all_gather_with_grad``);
    the sampled rows get exactly ``dL/drows`` and wait in ``pending`` for ``SparseSGD.step``.

    The weights are not ``nn.Parameter``s: nothing may build a dense ``num_local x D``
    gradient, and the head lives outside ZeRO and DDP.
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
        self.gemm_dtype = gemm_dtype
        weight = init_centres(seed, self.class_start, self.num_local, embedding_size, dtype)
        self.bank = CenterBank(weight.to(device), momentum_dtype, seed=seeds.rounding(seed, rank))
        self.sampler = ClassSampler(self.num_local, sample_rate, seed, rank, device)
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
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(
                f"label {value} is outside [0, num_classes={self.num_classes}) "
                f"({int(bad.sum())} bad label(s) in the global batch)"
            )

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(local_embeddings, local_labels)
        group = self.process_group
        sizes = gather_sizes(local_labels.shape[0], local_labels.device, group)
        # Labels first: every rank sees a bad label and raises together, none hangs in a collective.
        labels = all_gather_no_grad(local_labels.long(), sizes, group).to(self.bank.device)
        self._check_labels(labels)
        embeddings = all_gather_with_grad(local_embeddings.float(), sizes, group)
        embeddings = embeddings.to(self.bank.device)

        local = labels - self.class_start
        in_shard = (local >= 0) & (local < self.num_local)
        index, remap = self.sampler.sample(local[in_shard])
        target = torch.full_like(labels, -1)
        target[in_shard] = remap

        slot = len(self.pending)
        rows = self.workspace.get(f"rows{slot}", (len(index), self.embedding_size), torch.float32)
        self.bank.gather(index, out=rows)
        sampled = SampledRows(index, rows, slot, self.workspace)
        self.pending.append(sampled)
        emb_n = torch.nn.functional.normalize(embeddings, dim=1)
        cosine = sampled_cosine(emb_n, rows, sampled, self.gemm_dtype)
        logits = self.workspace.get(f"logits{slot}", tuple(cosine.shape), torch.float32)
        return margin_softmax_cross_entropy(cosine, target, self.margin_loss, group, logits)

    # ---- state -------------------------------------------------------------------------------

    def meta(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in _META_KEYS}

    def state_dict(self, *args, **kwargs) -> dict:  # type: ignore[override]
        """This rank's shard: weight, momentum, RNG states and the sharding it belongs to.

        ``rounding_rng`` drives bf16 stochastic rounding; it is optional on load.
        """
        return {
            "weight": self.weight.detach().clone(),
            "momentum": None if self.momentum is None else self.momentum.detach().clone(),
            "rng": self.sampler.state(),
            "rounding_rng": self.bank.rounding.get_state(),
            "meta": self.meta(),
        }

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load a shard written by the same sharding; anything else raises, never re-initialises."""
        missing = {"weight", "momentum", "rng", "meta"} - set(state)
        if missing:
            raise ValueError(f"head state_dict lacks key(s) {sorted(missing)}")
        mine, theirs = self.meta(), state["meta"]
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
        weight = state["weight"]
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"head weight shape {tuple(weight.shape)} != {tuple(self.weight.shape)}"
            )
        self.bank.weight.copy_(weight)
        mom = state["momentum"]
        if mom is None:
            self.bank.momentum = None
        else:
            if tuple(mom.shape) != tuple(self.weight.shape):
                raise ValueError(
                    f"head momentum shape {tuple(mom.shape)} != {tuple(self.weight.shape)}"
                )
            self.bank.momentum = mom.to(self.bank.device, self.bank.momentum_dtype).clone()
        self.sampler.load_state(state["rng"])
        if state.get("rounding_rng") is not None:  # optional: resharded shards re-seed it
            self.bank.rounding.set_state(state["rounding_rng"])
        self.pending.clear()
