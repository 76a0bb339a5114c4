"""Open a data set named by ``DataConfig`` and refuse it before training if it is unusable.

Every problem the loader could hit mid-run -- bad framing, non-integer labels, labels beyond
the head's class count, a ``property`` that says the images are not 112x112 -- is found here,
at start-up, with the record key and byte offset; except, for insightface's layout, whose index
comes from its identity records without reading the image records, a bad image record's
framing, which is found (and named) when training first reads it. Every data error is a
``DataError`` whose first line names the path; a missing or unreadable file is one line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np

from . import cache
from .config import DataConfig
from .folder import FolderScan, save_label_map, scan_folder
from .insightface import read_property, split_prefix
from .recordio import BadRecord
from .scan import Problem, RecScan, check_label_range

_SHOWN = 5
_SUBSTITUTES = 16  # records tried after a bad one before a run of bad records is refused
log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data set cannot be trained on as configured; the message names the path."""


class BadRecordError(DataError):
    """A record found bad when training read it; ``problem`` names it."""

    def __init__(self, message: str, problem: Problem) -> None:
        super().__init__(message)
        self.problem = problem


def _warn_extra_classes(path: str, own: int, configured: int | None) -> None:
    """A head larger than the data set trains centres no image ever pulls (fewer: an error)."""
    if configured is not None and configured > own:
        log.warning(
            "%s: data.num_classes=%d but the data set has %d identities; the head keeps %d "
            "centres that no image is labelled with",
            path,
            configured,
            own,
            configured - own,
        )


def _summary(problems: list[Problem]) -> str:
    lines = [f"  {p}" for p in problems[:_SHOWN]]
    if len(problems) > _SHOWN:
        lines.append(f"  ... and {len(problems) - _SHOWN} more")
    return "\n".join(lines)


class RecDataset:
    """Image records of an insightface/im2rec ``.rec``; bytes are sliced from an mmap.

    The index table is mapped read-only from ``cfg.cache_dir``, built there once by whichever
    rank takes its lock first (``cache.open_index``). For insightface's layout it comes from the
    identity records, so the image records' headers are first read when training reads them:
    a bad one is refused then, naming it, or with ``skip_corrupt`` replaced by the next good
    record in file order (its own label), logged and counted in ``skipped``. Other layouts are
    scanned record by record at open, and their bad records refused or left out up front.
    ``reader: native`` with ``skip_corrupt`` scans too, since DALI's reader picks the records.
    """

    kind = "rec"

    def __init__(self, cfg: DataConfig) -> None:
        assert cfg.path is not None
        self.prefix = split_prefix(cfg.path)
        self.path = self.prefix + ".rec"
        self.skip_corrupt = cfg.skip_corrupt
        full = cfg.skip_corrupt and cfg.reader == "native"
        try:
            self.scan: RecScan = cache.open_index(self.prefix, cfg.cache_dir, full=full)
            prop = read_property(self.prefix)
        except (OSError, ValueError) as exc:  # a missing or malformed .rec, .idx or property
            folder = os.path.isdir(cfg.path) and not os.path.isfile(self.path)
            hint = "; for a folder of identity folders set data.source: folder" if folder else ""
            raise DataError(f"{exc}{hint}") from exc
        if prop is not None and not cfg.resizes:
            _check_property_size(self.path, prop.image_size, prop.mixed, cfg.image_size)
        self.skipped = list(self.scan.problems)
        if self.skipped and not cfg.skip_corrupt:
            raise DataError(
                f"{self.prefix}.rec: {len(self.skipped)} bad record(s):\n{_summary(self.skipped)}\n"
                "Set data.skip_corrupt: true to train without them, or inspect with "
                f"`python -m data_pipelines.check {self.prefix}`."
            )
        if self.skipped:
            log.warning(
                "%s.rec: skipping %d bad record(s) (data.skip_corrupt):\n%s",
                self.prefix,
                len(self.skipped),
                _summary(self.skipped),
            )
        if self.scan.num_images == 0:
            raise DataError(f"{self.prefix}.rec holds no image records")
        self.labels = self.scan.labels
        own = self.scan.declared_classes or int(self.labels.max()) + 1
        self.num_classes = cfg.num_classes or own
        _warn_extra_classes(f"{self.prefix}.rec", own, cfg.num_classes)
        bad = check_label_range(self.labels, self.scan.keys, self.scan.offsets, self.num_classes)
        if bad:
            raise DataError(
                f"{self.prefix}.rec: labels beyond the head's classes:\n{_summary(bad)}"
            )
        self.label_map_path: str | None = None  # labels are the file's own
        self._mm: np.ndarray | None = None
        self._late: set[int] = set()  # records found bad when read (skip_corrupt)
        self._late_lock = threading.Lock()

    @property
    def num_images(self) -> int:
        return self.scan.num_images

    def read(self, i: int) -> np.ndarray:
        """Encoded bytes of image ``i``; ``BadRecordError`` names a record found bad now."""
        if self._mm is None:  # mapped lazily: each process that reads maps its own view
            self._mm = np.memmap(self.scan.rec_path, dtype=np.uint8, mode="r")
        try:
            return np.frombuffer(self.scan.image_bytes(self._mm, int(i)), dtype=np.uint8)
        except BadRecord as exc:
            problem = Problem(
                exc.kind, int(self.scan.keys[i]), int(self.scan.offsets[i]), exc.detail
            )
            raise BadRecordError(
                f"{self.path}: {problem} (found when read; set data.skip_corrupt: true to train "
                f"past bad records, or list them all with `python -m data_pipelines.check "
                f"{self.prefix} --full`)",
                problem,
            ) from exc

    def read_batch(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """(encoded bytes, labels) of ``indices``; a bad record's place goes to the next good
        record in file order when ``skip_corrupt`` (same every run: resume stays exact)."""
        labels = np.array(self.labels[indices])
        out = []
        for j, i in enumerate(indices):
            i = int(i)
            for step in range(_SUBSTITUTES + 1):
                k = (i + step) % self.num_images
                try:
                    out.append(self.read(k))
                    break
                except BadRecordError as exc:
                    if not self.skip_corrupt:
                        raise
                    self._skip(k, exc.problem)
            else:
                raise DataError(
                    f"{self.path}: {_SUBSTITUTES + 1} bad records in a row from key "
                    f"{int(self.scan.keys[i])}; inspect with `python -m data_pipelines.check "
                    f"{self.prefix} --full`"
                )
            if k != i:
                labels[j] = self.labels[k]
        return out, labels

    def _skip(self, i: int, problem: Problem) -> None:
        with self._late_lock:
            if i in self._late:
                return
            self._late.add(i)
            self.skipped.append(problem)
        log.warning(
            "%s: %s; training on the next good record in its place (data.skip_corrupt)",
            self.path,
            problem,
        )

    def describe(self, i: int) -> str:
        return f"record key={int(self.scan.keys[i])} offset={int(self.scan.offsets[i])}"

    def image_index(self) -> str:
        """A ``.idx`` listing only the image records, for ``fn.readers.mxnet`` (built once)."""
        return cache.image_index(self.scan)


class FolderDataset:
    """Images in ``root/<identity>/``; bytes are read from the file on demand."""

    kind = "folder"

    def __init__(self, cfg: DataConfig) -> None:
        assert cfg.path is not None
        self.path = cfg.path
        try:
            self.scan: FolderScan = scan_folder(cfg.path)
        except (OSError, ValueError) as exc:  # not a directory, no identity folders
            raise DataError(str(exc)) from exc
        if self.scan.num_images == 0:
            raise DataError(f"{cfg.path}: the identity folders hold no images")
        self.labels = self.scan.labels
        self.skipped: list[Problem] = []
        self.num_classes = cfg.num_classes or len(self.scan.class_names)
        _warn_extra_classes(cfg.path, len(self.scan.class_names), cfg.num_classes)
        bad = check_label_range(self.labels, self.scan.files, None, self.num_classes)
        if bad:
            raise DataError(
                f"{cfg.path}: {len(self.scan.class_names)} identity folders but num_classes "
                f"{self.num_classes}:\n{_summary(bad)}"
            )
        self.label_map_path: str | None = None
        if cfg.cache_dir is not None:
            key = hashlib.sha1(os.path.abspath(cfg.path).encode()).hexdigest()[:16]
            name = f"{Path(cfg.path).name}-{key}.labels.json"
            self.label_map_path = str(save_label_map(self.scan, Path(cfg.cache_dir) / name))

    @property
    def num_images(self) -> int:
        return self.scan.num_images

    def read(self, i: int) -> np.ndarray:
        return np.fromfile(self.scan.path(int(i)), dtype=np.uint8)

    def read_batch(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        return [self.read(int(i)) for i in indices], self.labels[indices]

    def describe(self, i: int) -> str:
        return f"file {self.scan.path(int(i))}"


def _check_property_size(
    path: str, size: tuple[int, int] | None, mixed: bool, image_size: int
) -> None:
    """Refuse what would crash (smaller) or silently crop (larger) in a centre crop."""
    if mixed:
        raise DataError(
            f"{path}: its property file says the images differ in size; "
            f"set data.resize: true to resize them to {image_size}x{image_size}"
        )
    if size is not None and size != (image_size, image_size):
        raise DataError(
            f"{path}: its property file says the images are {size[1]}x{size[0]}, not "
            f"{image_size}x{image_size}; set data.resize: true to resize them"
        )


def mismatch_message(path: str, where: str, example: str, image_size: int) -> str:
    """One line for a batch DALI could not assemble because images differ in size."""
    return (
        f"{path}: images of mismatched sizes at {where} ({example}, expected "
        f"{image_size}x{image_size}); set data.resize: true to resize them"
    )


def undecodable_message(path: str, where: str, lines: list[str]) -> str:
    """The samples a decoder could not decode (``lines``: ``"  <record>: <why>"``)."""
    return (
        f"{path}: undecodable image(s) at {where}:\n"
        + "\n".join(sorted(set(lines)))
        + f"\nFind all with `python -m data_pipelines.check {path} --full`."
    )


def open_dataset(cfg: DataConfig) -> RecDataset | FolderDataset:
    """Open and validate ``cfg.path``; raises ``DataError`` naming keys/offsets/files."""
    if cfg.source == "rec":
        return RecDataset(cfg)
    if cfg.source == "folder":
        return FolderDataset(cfg)
    raise ValueError(f"data.source {cfg.source!r} has no files to open")
