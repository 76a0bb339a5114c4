"""Rebuild a lost ``.idx``: ``python -m data_pipelines.index PREFIX.rec [--force]``.

Walks the record framing of the ``.rec`` from byte 0 (``recordio.iter_offsets``: headers only,
no payload copies) and writes ``key<TAB>offset`` lines with keys 0, 1, 2, ... in file order.
Those are the keys ``pack``, ``synth``, insightface's shipped files and an unshuffled im2rec
use, so the result is their ``.idx`` byte for byte and insightface's header key ranges stay
valid. The index is written to a temporary name and renamed, so an interrupted run never leaves
a partial ``.idx`` for a loader to trust. A bad record stops the run with its byte offset.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
from typing import TextIO

from tqdm import tqdm

from . import recordio
from .insightface import split_prefix

_TICK = 1 << 16  # records between progress-bar updates


def rebuild_index(
    rec_path: str | os.PathLike, *, force: bool = False, progress: bool = False
) -> int:
    """Write ``PREFIX.idx`` for ``PREFIX.rec``; return the number of records indexed.

    Raises ``FileNotFoundError`` for a missing ``.rec``, ``FileExistsError`` for an existing
    ``.idx`` without ``force``, and ``RecordError`` naming the byte offset of the first corrupt
    or truncated record (no ``.idx`` is written then).
    """
    prefix = split_prefix(rec_path)
    rec, idx = prefix + ".rec", prefix + ".idx"
    if not os.path.isfile(rec):
        raise FileNotFoundError(f"{rec} not found")
    if os.path.exists(idx) and not force:
        raise FileExistsError(f"{idx} exists; pass --force to replace it")
    tmp = f"{idx}.tmp{os.getpid()}"
    try:
        with open(rec, "rb") as f, open(tmp, "w") as out:
            if os.fstat(f.fileno()).st_size == 0:
                count = 0  # mmap refuses an empty file, which holds no records anyway
            else:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    count = _write(rec, buf, out, progress)
        os.replace(tmp, idx)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def _write(rec: str, buf: mmap.mmap, out: TextIO, progress: bool) -> int:
    """Write a ``key<TAB>offset`` line per record of ``buf`` to ``out``; return the count."""
    count = 0
    with tqdm(total=len(buf), desc="index", unit="B", unit_scale=True, disable=not progress) as bar:
        try:
            for offset in recordio.iter_offsets(buf):  # yields only records whose framing is good
                out.write(f"{count}\t{offset}\n")
                count += 1
                if count % _TICK == 0:
                    bar.update(offset - bar.n)
        except recordio.RecordError as exc:
            raise recordio.RecordError(
                f"{rec}: {exc}; {count} good record(s) before it; no index written"
            ) from exc
        bar.update(len(buf) - bar.n)
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipelines.index", description=__doc__.splitlines()[0]
    )
    ap.add_argument("rec", help="PREFIX.rec (or PREFIX) whose PREFIX.idx to rebuild")
    ap.add_argument("--force", action="store_true", help="replace an existing PREFIX.idx")
    a = ap.parse_args(argv)
    try:
        n = rebuild_index(a.rec, force=a.force, progress=True)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, recordio.RecordError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    prefix = split_prefix(a.rec)
    print(f"indexed {n} records of {prefix}.rec into {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
