"""``decoder: nvimgcodec``: the ``external`` reader's samples, decoded by nvImageCodec, no DALI.

For machines where DALI cannot go (no matching build for the CUDA stack, too heavy to carry:
the GPU machine we borrow has neither DALI nor room for its wheel) but a GPU should still
decode. Everything but the decoder is the ``external`` reader's: the same ``ShardPlan`` order
and ``draw_params`` draws per sample position, so the same samples, labels, flips and
augmentation choices as the DALI loader for a seed, the same state (a checkpoint of either
resumes the other), and the same errors naming records.

One background thread (the ``Feeder``'s) reads the bytes, decodes a batch and augments it with
torch ops (``torch_augment``), ``prefetch`` batches ahead. On CUDA it decodes on the device
from pinned staging on its own stream and waits for that stream itself, so a batch handed to
the training thread is complete and that thread never waits on the device for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .feeder import Batch
from .imgcodec import JpegDecoder
from .jpeg import decode_error
from .params import active_params
from .sources import DataError, FolderDataset, RecDataset, mismatch_message, undecodable_message
from .stream_loader import StreamLoader
from .torch_augment import augment_batch


class CodecLoader(StreamLoader):
    """``external`` sample order, nvImageCodec decode, torch augmentation."""

    def __init__(self, cfg: DataConfig, dataset: RecDataset | FolderDataset, **kw: Any) -> None:
        super().__init__(cfg, dataset, **kw)
        self._decoder = JpegDecoder(self.device, cfg.num_threads)
        self._names = active_params(cfg.dali_aug)
        gpu = self.device.type == "cuda"
        self._dtype = torch.float16 if gpu else torch.float32
        # the training thread's stream (this constructor runs on it), and the decode stream
        self._consumer = torch.cuda.current_stream(self.device) if gpu else None
        self._side = torch.cuda.Stream(self.device) if gpu else None

    def _open_epoch(self) -> None:
        if not self._stream_is_here():
            self._start_stream(self.cfg.prefetch, prepare=self._prepare)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        assert self._feeder is not None and self._stream is not None
        try:
            images, labels, valid = self._feeder.take()
        except DataError:
            self._shutdown()  # the stream stopped at the bad batch; rebuilt on the next call
            raise
        self._advance_stream()
        return images, labels, valid

    # -- on the feeder thread ------------------------------------------------------------------
    def _prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        valid = self.plan.valid(batch.start, batch.step)
        if self._side is None:
            return self._decode(batch)[0], torch.from_numpy(batch.labels.astype(np.int64)), valid
        with torch.cuda.device(self.device), torch.cuda.stream(self._side):
            images, decoded = self._decode(batch)
            labels = torch.from_numpy(batch.labels.astype(np.int64)).pin_memory()
            labels = labels.to(self.device, non_blocking=True)
        self._side.synchronize()  # this thread waits, not the trainer; frees the staging
        del decoded  # nvImageCodec's device buffers, released only after their last reader
        for t in (images, labels):  # freed by the trainer's stream, not reused early
            t.record_stream(self._consumer)
        return images, labels, valid

    def _decode(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(augmented batch, the decoded images it was made from)."""
        where = f"epoch {batch.epoch} step {batch.step}"
        decoded = self._decoder.decode(batch.jpegs, self._side)
        bad = [
            f"  {self.dataset.describe(i)}: {decode_error(batch.jpegs[k]) or 'nvImageCodec could not decode it'}"
            for k, i in enumerate(batch.indices)
            if decoded[k] is None
        ]
        if bad:
            raise DataError(undecodable_message(self.dataset.path, where, bad))
        side = self.cfg.image_size
        if not self.cfg.resizes:  # DALI's centre crop fails on a smaller image
            for k, img in enumerate(decoded):
                height, width = img.shape[:2]
                if height < side or width < side:
                    example = f"{self.dataset.describe(batch.indices[k])} is {width}x{height}"
                    raise DataError(mismatch_message(self.dataset.path, where, example, side))
        params = dict(zip(self._names, batch.params, strict=True))
        images = augment_batch(
            decoded,
            params,
            self.cfg.dali_aug,
            resize_to=self.cfg.resizes,
            size=side,
            dtype=self._dtype,
        )
        return images, decoded

    def close(self) -> None:
        """Stop the decode thread now (it also stops at exit); the loader reopens on use."""
        self._close()
        self._shutdown()
