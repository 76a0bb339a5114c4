"""NVIDIA nvImageCodec as a batch JPEG decoder into torch tensors, without DALI.

DALI decodes with nvImageCodec itself, but DALI is a 424 MB wheel built per CUDA major; the
codec library alone is about 30 MB (``nvidia-nvimgcodec-cu12``, or ``-cu13`` plus
``nvidia-nvjpeg``), so it travels where DALI cannot and decodes on the GPU (nvJPEG: hardware,
hybrid or CUDA back ends) from host bytes. On a machine without a GPU it decodes on the CPU
(libjpeg-turbo) when built with ``NVIMGCODEC_DEVICE_CPU_ONLY`` and the CPU back end only; any
other construction fails there with ``CUDA Runtime failure: '#35'``.

Import noise. On import, nvImageCodec prints to the C ``stderr`` (not Python's) an error for
each optional codec library it cannot load. nvTIFF and nvJPEG2000 are never needed for JPEG, so
those lines are dropped (the import runs with fd 2 captured; every other line is written back);
nvJPEG is dropped only for CPU decoding, and its absence on a GPU is an error naming the wheel.
``PYNVIMGCODEC_VERBOSITY`` (its documented knob, read at import) defaults to 1, errors only:
its per-image "could not parse" warnings are replaced by a ``DataError`` naming the record.

Threads. ``Decoder.decode`` releases the GIL while decoding but takes it back about once per
few images (measured: a 128-image batch took 165 ms instead of 8 ms next to a thread spinning
in pure Python, at the default 5 ms switch interval), so it suits a feeder thread beside a
training thread that spends its time inside torch ops, not one busy in Python.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .sources import DataError

_HARMLESS = re.compile(r"nvjpeg2k|nvjpeg2000|nvtiff", re.IGNORECASE)
_NVJPEG = re.compile(r"nvjpeg(?!2k)", re.IGNORECASE)
_NVJPEG_MISSING = re.compile(r"failed to load nvjpeg library", re.IGNORECASE)
_loaded: dict[str, Any] = {}  # "module", "nvjpeg_missing": one import per process


def nvjpeg_wheel() -> str:
    """nvJPEG's wheel for this torch's CUDA major (13: one wheel for all 13.x)."""
    return "nvidia-nvjpeg" if (torch.version.cuda or "").startswith("13") else "nvidia-nvjpeg-cu12"


def wheels() -> str:
    """The pip install line for this torch's CUDA major; a CPU torch needs no nvJPEG."""
    cuda = torch.version.cuda or ""
    codec = "nvidia-nvimgcodec-cu13" if cuda.startswith("13") else "nvidia-nvimgcodec-cu12"
    return f"pip install {codec}" + (f" {nvjpeg_wheel()}" if cuda else "")


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[str], bool]) -> Iterator[list[str]]:
    """Capture file descriptor 2 (what C libraries print) and write back the lines ``drop``
    refuses; the captured lines are appended to the yielded list."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.extend(tmp.read().decode(errors="replace").splitlines(keepends=True))
            kept = "".join(line for line in captured if not drop(line))
            if kept:
                os.write(2, kept.encode())


def unused_codec(line: str, gpu: bool) -> bool:
    """A line about a codec library JPEG decoding here does not use (nvJPEG: CPU decode only)."""
    return bool(_HARMLESS.search(line) or (not gpu and _NVJPEG.search(line)))


def load(gpu: bool) -> ModuleType:
    """``nvidia.nvimgcodec``, imported once; ``DataError`` (one line) if it is missing, or if
    ``gpu`` and it could not load nvJPEG."""
    if "module" not in _loaded:
        if "nvidia.nvimgcodec" not in sys.modules:
            os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "1")
        try:
            with filtered_stderr(lambda line: unused_codec(line, gpu)) as lines:
                nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
        except ImportError as exc:
            raise DataError(
                f"data.decoder: nvimgcodec needs NVIDIA nvImageCodec, which does not import "
                f"here ({exc}); install it with `{wheels()}`"
            ) from exc
        _loaded["module"] = nvimgcodec
        _loaded["nvjpeg_missing"] = any(_NVJPEG_MISSING.search(line) for line in lines)
    if gpu and _loaded["nvjpeg_missing"]:
        raise DataError(
            "data.decoder: nvimgcodec on a GPU needs nvJPEG, which nvImageCodec could not load; "
            f"install it with `pip install {nvjpeg_wheel()}`"
        )
    return _loaded["module"]


class PinnedStaging:
    """One page-locked host buffer that a batch's encoded bytes are copied into before a GPU
    decode, so nvJPEG's host-to-device copies are asynchronous DMA; grown when a batch needs
    more. ``CodeStream`` keeps a view, not a copy: the caller must not stage the next batch
    until the decode of this one has finished on its stream."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def stage(self, jpegs: list[np.ndarray]) -> list[np.ndarray]:
        total = sum(len(j) for j in jpegs)
        if self._buffer is None or self._buffer.numel() < total:
            grown = max(total, 2 * (0 if self._buffer is None else self._buffer.numel()))
            self._buffer = torch.empty(grown, dtype=torch.uint8, pin_memory=True)
        host = self._buffer.numpy()
        views, offset = [], 0
        for data in jpegs:
            n = len(data)
            host[offset : offset + n] = data
            views.append(host[offset : offset + n])
            offset += n
        return views


class JpegDecoder:
    """Batch decode to HWC uint8 RGB tensors on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the
    CPU). Undecodable images come back as ``None``. Not thread-safe: one thread decodes."""

    def __init__(self, device: torch.device, num_threads: int) -> None:
        self.device = device
        self.gpu = device.type == "cuda"
        nvimgcodec = load(self.gpu)
        self._codec = nvimgcodec
        if self.gpu:
            index = device.index if device.index is not None else torch.cuda.current_device()
            # default back ends: hardware, hybrid and CUDA nvJPEG, CPU for what they refuse
            self._decoder = nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=num_threads)
            self._staging: PinnedStaging | None = PinnedStaging()
        else:
            self._decoder = nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
                max_num_cpu_threads=num_threads,
            )
            self._staging = None
        # RGB, 3 interleaved channels whatever the file holds (grey, CMYK), EXIF applied: as
        # DALI's fn.decoders.image(output_type=RGB)
        self._params = nvimgcodec.DecodeParams(
            color_spec=nvimgcodec.ColorSpec.SRGB, sample_format=nvimgcodec.SampleFormat.I_RGB
        )

    def decode(
        self, jpegs: list[np.ndarray], stream: torch.cuda.Stream | None = None
    ) -> list[torch.Tensor | None]:
        """On CUDA the decode and the returned tensors are ordered on ``stream`` (the caller's
        current stream if None); the pinned staging may be reused once ``stream`` has finished."""
        if not self.gpu:
            codes = [self._codec.CodeStream(np.asarray(data)) for data in jpegs]
            images = self._decoder.decode(codes, params=self._params)
            # zero-copy: each array's base is the Image that owns the pixels
            return [None if im is None else torch.from_numpy(np.asarray(im)) for im in images]
        stream = stream or torch.cuda.current_stream(self.device)
        assert self._staging is not None
        codes = [self._codec.CodeStream(view) for view in self._staging.stage(jpegs)]
        images = self._decoder.decode(codes, params=self._params, cuda_stream=stream.cuda_stream)
        with torch.cuda.stream(stream):  # the DLPack hand-over waits on nothing else
            return [None if im is None else torch.from_dlpack(im) for im in images]
