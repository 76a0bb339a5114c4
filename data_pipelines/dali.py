"""DALI pipeline graphs: encoded bytes in, normalised (B, 3, 112, 112) images out.

Two ways in. ``external``: our sampler hands DALI the JPEG bytes of exactly the samples it
chose (exact global shuffle of identity-sorted shipped files, O(1) resume). ``native``:
``fn.readers.mxnet`` over a filtered index of image records, or ``fn.readers.file``; the reader
runs in C++, but DALI 2.4 only shuffles through a buffer (``shuffle_after_epoch`` reorders whole
files), so on a file sorted by identity a batch sees few identities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nvidia.dali import backend, fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from .augment import active_params, augment


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
