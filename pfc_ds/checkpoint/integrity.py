"""Checkpoint file integrity: fsync, streamed checksums, and the file records of ``meta.json``.

A resume is only as good as the worst file it reads: a quota that truncates a shard, a node
killed mid-write or a flipped byte must be found *before* training continues from it, and a
power loss must not leave a ``meta.json`` or ``latest`` that names data still in the page cache.
So every file is fsynced (and its folder) before the commit point, and ``meta.json`` records each
file's size and xxh3-64 checksum. xxh3 streams at about 14 GB/s on one core here, 6x zlib's
crc32 (2.4 GB/s), so re-reading a just-written file from the page cache costs little beside the
write; a record names its algorithm, and crc32 is used when ``xxhash`` is not installed.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

_BLOCK = 8 << 20  # bytes per read: large enough for full speed, small beside any file

try:
    import xxhash
except ImportError:  # pragma: no cover - requirements.txt pins it
    xxhash = None

ALGORITHM = "xxh3_64" if xxhash is not None else "crc32"


def checksum(path: str | os.PathLike, algorithm: str = ALGORITHM) -> str:
    """The file's checksum, streamed in 8 MB blocks (no whole-file buffer)."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    if algorithm == "xxh3_64":
        if xxhash is None:
            raise RuntimeError("this checkpoint was checksummed with xxh3_64: pip install xxhash")
        h = xxhash.xxh3_64()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        return h.hexdigest()
    if algorithm == "crc32":
        crc = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                crc = zlib.crc32(view[:n], crc)
        return f"{crc:08x}"
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be
    fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "algorithm", "checksum"}`` of a written (and fsynced) file."""
    path = Path(path)
    return {"size": path.stat().st_size, "algorithm": ALGORITHM, "checksum": checksum(path)}


def problem(folder: Path, name: str, entry: dict[str, Any]) -> str | None:
    """What is wrong with ``folder/name`` against its record, or ``None``."""
    path = folder / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        kind = "truncated" if size < entry["size"] else "too long"
        return f"{path}: {size} bytes, expected {entry['size']} ({kind})"
    got = checksum(path, entry["algorithm"])
    if got != entry["checksum"]:
        return f"{path}: {entry['algorithm']} {got}, expected {entry['checksum']} (corrupt)"
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` durably under ``path``: temporary name, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
