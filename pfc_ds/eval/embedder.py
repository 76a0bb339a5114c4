"""Embed uint8 face crops with a backbone, as training saw them, and evaluate ``.bin`` sets.

Images are RGB uint8 ``(N, H, W, 3)`` (a numpy array, or an iterable of such batches, so a
decoder can stream). They are normalised exactly as the training pipelines do,
``(x - 127.5) / 127.5`` in float32 NCHW, and cast to the model's parameter dtype (a DeepSpeed
fp16/bf16 module takes half inputs). No autograd graph is kept (``inference_mode``; ``no_grad``
under ZeRO-3). With ``flip`` each image and its horizontal mirror run in
one forward and their raw embeddings are summed (insightface's "Accuracy-Flip").

For evaluation inside distributed training, ``embed_shard`` gives each rank a contiguous slice
and ``gather_embeddings`` reassembles the rows in order on every rank. Every rank runs the same
number of equally sized forwards (the last slice is padded), because under ZeRO-3 each forward
gathers the partitioned parameters collectively and a rank with one batch fewer would hang.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from pfc_ds.eval.bins import BinSet, decode_image, load_bin
from pfc_ds.eval.verification import VerificationResult, evaluate

Images = np.ndarray | Iterable[np.ndarray]


def _batches(images: Images, batch_size: int) -> Iterator[np.ndarray]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = (images,) if isinstance(images, np.ndarray) else images
    for batch in source:
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 RGB images (N, H, W, 3), got {batch.dtype} {batch.shape}"
            )
        for i in range(0, batch.shape[0], batch_size):
            yield batch[i : i + batch_size]


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _no_grad_mode(model: torch.nn.Module) -> AbstractContextManager[None]:
    """``inference_mode``, except for ZeRO-3 partitioned parameters (``ds_id``): DeepSpeed
    gathers them into tensors that training reuses, and inference tensors then fail in backward
    ("Inference tensors cannot be saved for backward"), so those get ``no_grad``."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return torch.no_grad()
    return torch.inference_mode()


def normalize_images(batch: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, H, W)`` ``(x - 127.5) / 127.5`` on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)


def decoded_batches(
    count: int,
    read: Callable[[int], bytes],
    image_size: int,
    batch_size: int,
    describe: Callable[[int], str],
    workers: int | None = None,
    crop: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Batches of ``read(i)`` decoded by Pillow (threads: it releases the GIL) to RGB uint8 at
    ``image_size``; a bad image is a ``ValueError`` naming ``describe(i)``. ``crop(i, image)``,
    if given, replaces the resize: it gets the full decoded image and returns the
    ``image_size`` crop (``pfc_ds.eval.align.norm_crop`` with image ``i``'s landmarks)."""
    workers = workers or min(4, os.cpu_count() or 1)

    def one(i: int) -> np.ndarray:
        try:
            data = read(i)
        except OSError as exc:
            raise FileNotFoundError(f"{describe(i)}: cannot be read ({exc.strerror})") from exc
        try:
            image = decode_image(data, None if crop is not None else image_size)
        except (OSError, ValueError) as exc:  # Pillow: UnidentifiedImageError is an OSError
            raise ValueError(f"{describe(i)}: does not decode ({exc})") from exc
        if crop is None:
            return image
        try:
            return crop(i, image)
        except ValueError as exc:  # e.g. degenerate landmarks
            raise ValueError(f"{describe(i)}: {exc}") from exc

    with ThreadPoolExecutor(workers) as pool:
        ahead: deque[list[Future[np.ndarray]]] = deque()
        for start in range(0, count, batch_size):  # decode one batch ahead of the model
            ahead.append(
                [pool.submit(one, i) for i in range(start, min(start + batch_size, count))]
            )
            if len(ahead) > 1:
                yield np.stack([f.result() for f in ahead.popleft()])
        while ahead:
            yield np.stack([f.result() for f in ahead.popleft()])


def embed_views(
    model: torch.nn.Module,
    images: Images,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    *,
    progress: bool | None = False,
    total: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw float32 embeddings of the images and (with ``flip``) of their mirrors, separately.

    ``device`` defaults to the model's; the model is left where it is and in the training mode
    it had. ``progress``: a tqdm bar (``None``: only on a terminal); ``total`` sizes it when
    ``images`` is an iterator.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = _model_dtype(model)
    if total is None and isinstance(images, np.ndarray):
        total = images.shape[0]
    plain: list[np.ndarray] = []
    mirrored: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        disable = None if progress is None else not progress  # None: tqdm's "only on a tty"
        with (
            _no_grad_mode(model),
            tqdm(total=total, unit="img", desc="embed", disable=disable) as bar,
        ):
            for batch in _batches(images, batch_size):
                x = normalize_images(batch, device)
                if flip:
                    x = torch.cat([x, x.flip(3)])
                out = model(x.to(dtype)).float().cpu().numpy()
                n = batch.shape[0]
                plain.append(out[:n])
                if flip:
                    mirrored.append(out[n:])
                bar.update(n)
    finally:
        model.train(was_training)
    if not plain:
        raise ValueError("no images to embed")
    return np.concatenate(plain), (np.concatenate(mirrored) if flip else None)


def embed_images(
    model: torch.nn.Module,
    images: Images,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    *,
    progress: bool | None = False,
    total: int | None = None,
) -> np.ndarray:
    """Raw (un-normalised) float32 ``(N, D)`` embeddings, flip-summed with ``flip``."""
    plain, mirrored = embed_views(
        model, images, batch_size, device, flip, progress=progress, total=total
    )
    return plain + mirrored if mirrored is not None else plain


def evaluate_bin(
    model: torch.nn.Module,
    path: str | os.PathLike | BinSet,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    nfolds: int = 10,
    *,
    image_size: int = 112,
    flip: bool = True,
    progress: bool | None = False,
) -> VerificationResult:
    """insightface's verification of ``model`` on a ``.bin`` (a path, or a ``load_bin`` result
    to decode once and evaluate often). ``mean_norm`` is insightface's XNorm: the mean norm of
    the single-pass embeddings (unflipped and flipped), not of their sum."""
    data = path if isinstance(path, BinSet) else load_bin(path, image_size)
    plain, mirrored = embed_views(model, data.images, batch_size, device, flip, progress=progress)
    emb = plain + mirrored if mirrored is not None else plain
    result = evaluate(emb, data.issame, nfolds)
    views = [plain] if mirrored is None else [plain, mirrored]
    xnorm = np.concatenate([np.linalg.norm(v.astype(np.float64), axis=1) for v in views]).mean()
    return replace(result, mean_norm=float(xnorm))


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous share: sizes differ by at most one, the first
    ``total % world_size`` ranks take the extra row (the head's class sharding)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(total, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (rank < extra)


def embed_shard(
    model: torch.nn.Module,
    images: np.ndarray,
    rank: int,
    world_size: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
) -> np.ndarray:
    """This rank's rows ``shard_bounds(len(images), ...)`` of ``embed_images``.

    Every rank embeds ``ceil(N / world_size)`` images (its slice padded with copies of image 0),
    so all ranks run the same forwards; the padding rows are dropped from the result.
    """
    start, stop = shard_bounds(images.shape[0], world_size, rank)
    chunk = math.ceil(images.shape[0] / world_size)
    local = images[start:stop]
    if local.shape[0] < chunk:
        pad = np.repeat(images[:1], chunk - local.shape[0], axis=0)
        local = np.concatenate([local, pad])
    return embed_images(model, local, batch_size, device, flip)[: stop - start]


def gather_embeddings(
    local: torch.Tensor | np.ndarray, total: int, group: object | None = None
) -> torch.Tensor:
    """All ``total`` rows on every rank, in order, from each rank's ``embed_shard`` rows.

    ``all_gather`` needs equal sizes, so each rank sends its rows padded to
    ``ceil(total / W)``. Pass tensors on the backend's device (CUDA for NCCL).
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = torch.as_tensor(local)
    start, stop = shard_bounds(total, world, rank)
    if local.ndim != 2 or local.shape[0] != stop - start:
        raise ValueError(
            f"rank {rank} holds {tuple(local.shape)} rows, expected {stop - start} of {total}"
        )
    chunk = math.ceil(total / world)
    padded = local.new_zeros((chunk, local.shape[1]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    pieces = []
    for r, part in enumerate(parts):
        a, b = shard_bounds(total, world, r)
        pieces.append(part[: b - a])
    return torch.cat(pieces)


def resolve_device(name: str) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N``; a GPU device without CUDA is a ``ValueError``."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_checkpoint_model(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, int, dict]:
    """(fp32 eval-mode backbone on ``device``, its input image size, the checkpoint's meta with
    its ``folder``) of anything ``pfc_ds.checkpoint.open_checkpoint`` takes."""
    from pfc_ds.checkpoint import reader

    device = resolve_device(str(device))
    model, ref = reader.load_backbone(checkpoint)
    meta = {**ref.meta, "folder": str(ref.folder)}
    return model.to(device).eval(), int(meta["image_size"]), meta
