"""DALI pipeline graphs: encoded bytes in, normalised (B, 3, 112, 112) images out.

Also how a loader starts its pipeline and copies DALI's outputs into torch tensors: everything
that imports DALI lives here and in ``augment.py``, ``external.py`` and ``native.py``, so the
``nvimgcodec`` decoder never imports it.

Two ways in. ``external``: our sampler hands DALI the JPEG bytes of exactly the samples it
chose (exact global shuffle of identity-sorted shipped files, O(1) resume). ``native``:
``fn.readers.mxnet`` over a filtered index of image records, or ``fn.readers.file``; the reader
runs in C++, but DALI 2.4 only shuffles through a buffer (``shuffle_after_epoch`` reorders whole
files), so on a file sorted by identity a batch sees few identities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from nvidia.dali import backend, fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from .augment import augment
from .loader import Loader, mix_seed
from .params import active_params


def gpu_count() -> int:
    """CUDA devices DALI can use; 0 on CPU-only machines (chosen up front, never by a crash)."""
    return int(backend.GetCUDADeviceCount())


def decoder_device(use_gpu: bool) -> str:
    """``mixed`` (nvJPEG: host bytes in, device pixels out) on a GPU, else ``cpu``."""
    return "mixed" if use_gpu else "cpu"


def build_pipeline(
    *,
    feed: Callable[[], Any],
    reader: dict[str, Any] | None,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    prefetch: int,
    seed: int,
    probs: dict[str, float],
    resize: bool,
    image_size: int = 112,
) -> Pipeline:
    """Build (not yet started) a pipeline returning ``(images, labels)``.

    ``reader`` None: ``feed()`` returns ``(jpegs, labels, *params)`` per batch and raises
    ``StopIteration`` at the end. ``reader = {"op": "mxnet" | "file", **kwargs}``: the DALI
    reader supplies jpegs and labels and ``feed()`` only the augmentation parameters.
    ``device_id`` None runs on the CPU and outputs fp32; otherwise decode is ``mixed``, fp16.
    """
    use_gpu = device_id is not None
    names = active_params(probs)

    @pipeline_def(enable_conditionals=True)
    def graph():
        if reader is None:
            jpegs, labels, *params = fn.external_source(
                source=feed, num_outputs=2 + len(names), batch=True
            )
        else:
            kwargs = {k: v for k, v in reader.items() if k != "op"}
            op = fn.readers.mxnet if reader["op"] == "mxnet" else fn.readers.file
            jpegs, labels = op(**kwargs, name="reader")
            params = fn.external_source(source=feed, num_outputs=len(names), batch=True)
        images = fn.decoders.image(jpegs, device=decoder_device(use_gpu), output_type=types.RGB)
        named = {name: params[i] for i, name in enumerate(names)}
        return augment(images, named, probs, resize=resize, fp16=use_gpu, size=image_size), labels

    return graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,
    )


def start_pipeline(
    loader: Loader, *, feed: Callable[[], list[Any]], reader: dict[str, Any] | None
) -> Pipeline:
    """A started pipeline for this loader's epoch (seeded per seed, epoch and rank)."""
    cfg = loader.cfg
    use_gpu = loader.device.type == "cuda"
    device_id = (
        (loader.device.index if loader.device.index is not None else torch.cuda.current_device())
        if use_gpu
        else None
    )
    pipe = build_pipeline(
        feed=feed,
        reader=reader,
        batch_size=loader.batch_size,
        num_threads=cfg.num_threads,
        device_id=device_id,
        prefetch=cfg.prefetch,
        seed=mix_seed(loader.seed, loader.epoch, loader.rank),
        probs=cfg.dali_aug,
        resize=cfg.resize,
        image_size=cfg.image_size,
    )
    pipe.build()
    return pipe


def to_torch(images: Any, labels: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy DALI outputs into torch tensors on ``device``; labels become int64 (B,)."""
    dense = images.as_tensor()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = torch.empty(tuple(dense.shape()), dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    lab = np.asarray(labels.as_tensor()).reshape(len(labels), -1)[:, 0]
    if lab.dtype.kind == "f":  # mxnet reader yields float32; values were checked integral
        lab = np.rint(lab)
    return out, torch.from_numpy(lab.astype(np.int64)).to(device, non_blocking=True)
