"""Rows that stay in raw row-major files until they are copied: a checkpoint's row files, a disk
bank's own files.

A head shard's rows are contiguous row ranges of its class range, so loading, saving and
resharding are byte-range copies between files. ``FileRows`` names the ranges; a disk bank
copies them in the kernel (``copy_file_range``: a reflink where the file system shares
extents), every other bank reads them through one bounded buffer. Neither path ever holds a
whole shard in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Bytes read per piece of a buffered copy: full disk bandwidth, small beside any bank.
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class FileRows:
    """A ``shape``/``dtype`` tensor whose rows come from files: ``pieces`` of ``(file,
    src_row, dst_row, rows)``. Rows that no piece covers are zeros (an optimizer state of a
    row never updated)."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # of the files
    pieces: tuple[tuple[Path, int, int, int], ...]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def covers_all(self) -> bool:
        return sum(p[3] for p in self.pieces) == self.shape[0]

    def read_into(
        self, target: torch.Tensor, done: Callable[[int, int], None] | None = None
    ) -> None:
        """``target[dst rows] = rows`` (any device and dtype: ``copy_`` converts), one chunk
        at a time, calling ``done(r0, r1)`` after each chunk of target rows; the rows no piece
        covers are left alone."""
        if tuple(target.shape) != tuple(self.shape):
            raise ValueError(f"rows of shape {self.shape} into a tensor of {tuple(target.shape)}")
        per = max(1, CHUNK_BYTES // max(1, self.row_bytes))
        for path, src_row, dst_row, rows in self.pieces:
            with open(path, "rb") as f:
                for k in range(0, rows, per):
                    n = min(per, rows - k)
                    r0 = dst_row + k
                    target[r0 : r0 + n].copy_(read_rows(f, path, src_row + k, n, self))
                    if done is not None:
                        done(r0, r0 + n)

    def write_file(self, dst: Path) -> None:
        """The whole tensor as one raw file at ``dst``: kernel-side range copies, zeros (a
        sparse hole) where no piece covers."""
        with open(dst, "w+b") as fo:
            fo.truncate(self.shape[0] * self.row_bytes)
            b = self.row_bytes
            for path, src_row, dst_row, rows in self.pieces:
                copy_range(path, fo, src_row * b, dst_row * b, rows * b)


def read_rows(f, path: Path, row: int, rows: int, like: FileRows) -> torch.Tensor:
    """Rows ``row:row + rows`` of the open file ``f`` as a CPU tensor of ``like``'s dtype."""
    b = like.row_bytes
    f.seek(row * b)
    data = bytearray(rows * b)
    if f.readinto(data) != len(data):
        raise OSError(f"{path}: short read of {rows} rows at row {row}")
    return torch.frombuffer(data, dtype=like.dtype).view(rows, *like.shape[1:])


def copy_range(src: Path, dst, src_off: int, dst_off: int, count: int) -> None:
    """``count`` bytes of ``src`` at ``src_off`` into the open file ``dst`` at ``dst_off``,
    without passing through this process."""
    with open(src, "rb") as fi:
        done = 0
        while done < count:
            n = os.copy_file_range(
                fi.fileno(), dst.fileno(), count - done, src_off + done, dst_off + done
            )
            if n == 0:
                raise OSError(f"{src}: {count - done} bytes short at offset {src_off + done}")
            done += n
