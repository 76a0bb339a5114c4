"""Where a ``.rec``'s index table lives and who builds it: one build per cache folder.

Every rank of a job opens its data set at the same moment. The first to take the table's file
lock (``fcntl.lockf``, which NFS and most cluster file systems honour across nodes) builds it;
the others block on the lock, then map what it published. With the default per-user cache
folder that is one build per node; with a folder shared by the nodes, one per job, and two nodes
never both write it. A build writes under a temporary name and renames the finished directory
into place (``table.publish``), so a build killed midway leaves a temporary directory that no
reader opens and the next builder deletes: never a half table that a later run trusts.

A table is keyed on the ``.rec``'s and ``.idx``'s path, size and mtime, and on what was asked:
``auto`` (from insightface's identity records when the file has them, ``layout.py``, else a
scan of every record) or ``full`` (a scan of every record, always).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from . import recordio
from .insightface import split_prefix
from .layout import build_layout
from .scan import property_classes, require_files, scan_into
from .table import COLUMNS, VERSION, RecScan, TableWriter, open_table, publish

log = logging.getLogger(__name__)
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_LINES = 1 << 16  # .idx lines formatted per step


def open_index(
    prefix: str | os.PathLike,
    cache_dir: str | os.PathLike | None,
    *,
    full: bool = False,
    progress: bool = False,
) -> RecScan:
    """The image-record table of ``PREFIX.rec``, mapped read-only from ``cache_dir``.

    Built there once (see the module docstring) and shared by every process that maps it.
    ``cache_dir`` None builds a private table in a temporary directory removed with the
    returned object. ``full`` reads every record's header even where identity records would
    do. Raises ``FileNotFoundError``, ``RecordError`` (a malformed ``.idx``) or ``LayoutError``.
    """
    prefix = split_prefix(prefix)
    rec, _ = require_files(prefix)
    declared = property_classes(prefix)
    if cache_dir is None:
        return _private(prefix, full, progress)
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / table_name(prefix, full)
    scan = open_table(final, rec, declared)
    if scan is not None:
        return scan
    with _lock(root / f"{final.name}.lock", f"the index of {rec}") as locked:
        if not locked:
            log.warning(
                "%s: file locks are not supported there; building a private index of %s",
                root,
                rec,
            )
            return _private(prefix, full, progress)
        scan = open_table(final, rec, declared)
        if scan is None:
            _clear(final)
            tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
            t0 = time.perf_counter()
            build_table(prefix, tmp, full=full, progress=progress)
            publish(tmp, final)
            scan = open_table(final, rec, declared)
            if scan is None:
                raise RuntimeError(f"{final}: the table just published does not open")
            log.info(
                "%s: index of %d images built in %.1f s (%s, %d record headers read) in %s",
                rec,
                scan.num_images,
                time.perf_counter() - t0,
                scan.layout,
                scan.records_read,
                final,
            )
    return scan


def build_table(
    prefix: str, directory: str | os.PathLike, *, full: bool = False, progress: bool = False
) -> None:
    """Write a whole (unpublished) table to the new ``directory``: from insightface's identity
    records unless ``full`` or the file lacks them, else by scanning every record."""
    directory = Path(directory)
    if not full:
        out = TableWriter(directory, ("keys", "offsets", "labels"))
        try:
            meta = build_layout(prefix, out)
        except BaseException:
            out.abort()
            raise
        if meta is not None:
            out.finish(meta)
            return
        out.abort()
    out = TableWriter(directory, tuple(COLUMNS))
    try:
        meta = scan_into(prefix, out, progress=progress)
    except BaseException:
        out.abort()
        raise
    out.finish(meta)


def table_name(prefix: str, full: bool) -> str:
    """``STEM-DIGEST-auto|full``: the digest covers the table format and the files' identity."""
    rec, idx = prefix + ".rec", prefix + ".idx"
    st, ist = os.stat(rec), os.stat(idx)
    ident = (
        f"{VERSION}|{os.path.abspath(rec)}|{st.st_size}|{st.st_mtime_ns}|"
        f"{ist.st_size}|{ist.st_mtime_ns}"
    )
    digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return f"{Path(rec).stem}-{digest}-{'full' if full else 'auto'}"


def image_index(scan: RecScan) -> str:
    """A ``.idx`` listing only ``scan``'s image records, for ``fn.readers.mxnet``.

    DALI sizes a record as the gap to the next listed offset and parses only the first
    record in it, so leaving header, identity and corrupt records out is safe. Written once
    into the table's directory (under the table's lock), in chunks.
    """
    if scan.table_dir is None:
        raise ValueError("image_index needs a mapped table (cache.open_index)")
    table = Path(scan.table_dir)
    path = table / "images.idx"
    if path.is_file():
        return str(path)
    with _lock(table.parent / f"{table.name}.lock", f"the image index of {scan.rec_path}"):
        if not path.is_file():
            tmp = table / f".images.idx.tmp-{socket.gethostname()}-{os.getpid()}"
            with open(tmp, "wb") as f:
                for lo in range(0, scan.num_images, _LINES):
                    hi = lo + _LINES
                    f.write(recordio.format_index(scan.keys[lo:hi], scan.offsets[lo:hi]))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    return str(path)


def _private(prefix: str, full: bool, progress: bool) -> RecScan:
    tmp = Path(tempfile.mkdtemp(prefix="data_pipelines-index-"))
    try:
        build_table(prefix, tmp / "table", full=full, progress=progress)
        scan = open_table(tmp / "table", prefix + ".rec", property_classes(prefix))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    assert scan is not None
    weakref.finalize(scan, shutil.rmtree, tmp, True)
    return scan


def _clear(final: Path) -> None:
    """Under the lock: remove dead builders' temporary directories and an unreadable table."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        log.warning("%s: not a whole table; building it again", final)
        shutil.rmtree(final, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path, what: str) -> Iterator[bool]:
    """Hold an exclusive ``lockf`` lock on ``path``; yields False where locks do not work.

    The holder writes its host and pid into the file, so a waiting rank can say whom it waits
    for. The kernel (or the NFS lock manager) releases the lock when the holder dies.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                yield False
                return
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            log.info("waiting for %s to build %s", holder, what)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        yield True
    finally:
        os.close(fd)  # releases the lock
