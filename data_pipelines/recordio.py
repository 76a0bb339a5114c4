"""Pure-Python MXNet RecordIO reader/writer and insightface's ``IRHeader``.

Users ship MS1MV3/Glint360K/WebFace42M as ``train.rec``/``train.idx`` written by MXNet; we read
and write the same bytes without depending on mxnet (unmaintained, no wheels for current Python).

Framing (dmlc-core ``recordio``): each record part is ``magic:uint32`` then ``lrec:uint32``
(upper 3 bits = continuation flag, lower 29 bits = part length), then the part, zero-padded to
4 bytes. The writer splits a payload wherever the magic number appears at a 4-byte aligned
position (cflag 1 = first part, 2 = middle, 3 = last; the magic itself is dropped and restored
by the reader), so a reader that only scans for the magic never resynchronises mid-record.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")  # magic, lrec
IR_FORMAT = "<IfQQ"  # flag, label, id, id2 -- insightface/mxnet ``IRHeader``
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
MAX_PART = (1 << 29) - 1


class RecordError(ValueError):
    """A record that cannot be framed: bad magic, truncated, bad continuation."""


class IRHeader(NamedTuple):
    """mxnet ``IRHeader``: ``flag`` > 0 means ``flag`` float32 labels follow the header."""

    flag: int
    label: float
    id: int
    id2: int


def encode_lrec(cflag: int, length: int) -> int:
    return (cflag << 29) | length


def decode_lrec(lrec: int) -> tuple[int, int]:
    return lrec >> 29, lrec & MAX_PART


def pack_payload(
    label: float | tuple[float, ...] | list[float], image: bytes, id_: int = 0
) -> bytes:
    """Build an insightface payload: a scalar label gives flag 0, a sequence gives flag = len."""
    if isinstance(label, (tuple, list)):
        head = struct.pack(IR_FORMAT, len(label), 0.0, id_, 0)
        return head + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack(IR_FORMAT, 0, float(label), id_, 0) + image


def unpack_payload(payload: bytes) -> tuple[IRHeader, tuple[float, ...], bytes]:
    """Split a payload into header, its label vector and the image bytes (may be empty)."""
    if len(payload) < IR_SIZE:
        raise RecordError(f"payload of {len(payload)} bytes is shorter than an IRHeader")
    header = IRHeader(*struct.unpack_from(IR_FORMAT, payload))
    if header.flag == 0:
        return header, (header.label,), payload[IR_SIZE:]
    end = IR_SIZE + 4 * header.flag
    if len(payload) < end:
        raise RecordError(
            f"IRHeader flag {header.flag} promises more labels than the payload holds"
        )
    labels = struct.unpack_from(f"<{header.flag}f", payload, IR_SIZE)
    return header, labels, payload[end:]


def frame(payload: bytes) -> bytes:
    """Frame one payload exactly as dmlc ``RecordIOWriter::WriteRecord`` does."""
    if len(payload) > MAX_PART:
        raise RecordError(f"record of {len(payload)} bytes exceeds the 2^29-1 RecordIO limit")
    out = bytearray()
    start = 0
    i = payload.find(MAGIC_BYTES)
    while i >= 0:
        if i % 4 == 0:  # dmlc only splits at aligned positions
            out += _LREC.pack(MAGIC, encode_lrec(1 if start == 0 else 2, i - start))
            out += payload[start:i]
            start = i + 4
            i = payload.find(MAGIC_BYTES, start)
        else:
            i = payload.find(MAGIC_BYTES, i + 1)
    out += _LREC.pack(MAGIC, encode_lrec(3 if start else 0, len(payload) - start))
    out += payload[start:]
    out += b"\0" * (-len(payload) % 4)
    return bytes(out)


def read_at(buf: bytes | memoryview | np.ndarray, offset: int) -> tuple[bytes, int]:
    """Read the record at ``offset`` of ``buf``; return (payload, offset of the next record)."""
    spans, nxt = record_spans(buf, offset)
    return MAGIC_BYTES.join(bytes(buf[start : start + length]) for start, length in spans), nxt


def record_spans(
    buf: bytes | memoryview | np.ndarray, offset: int
) -> tuple[list[tuple[int, int]], int]:
    """Check the framing of the record at ``offset`` without copying it.

    Returns the (start, length) of each part and the offset of the next record; raises
    ``RecordError`` naming the byte offset of a bad magic, truncation or continuation flag.
    """
    spans: list[tuple[int, int]] = []
    pos = offset
    while True:
        if pos + 8 > len(buf):
            raise RecordError(f"truncated record header at byte {pos}")
        magic, lrec = _LREC.unpack_from(buf, pos)
        if magic != MAGIC:
            raise RecordError(f"bad magic 0x{magic:08x} at byte {pos}")
        cflag, length = decode_lrec(lrec)
        start = pos + 8
        if start + length > len(buf):
            raise RecordError(
                f"truncated record at byte {pos}: needs {length} bytes, "
                f"{len(buf) - start} left in the file"
            )
        expected = (0, 1) if not spans else (2, 3)
        if cflag not in expected:
            raise RecordError(f"unexpected continuation flag {cflag} at byte {pos}")
        spans.append((start, length))
        pos = start + length + (-length % 4)
        if cflag in (0, 3):
            return spans, pos


class RecordWriter:
    """Write ``PREFIX.rec`` and ``PREFIX.idx`` (``key\\toffset`` lines), like MXIndexedRecordIO."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        prefix = os.fspath(prefix)
        self.rec_path, self.idx_path = prefix + ".rec", prefix + ".idx"
        self._rec: BinaryIO = open(self.rec_path, "wb")  # noqa: SIM115 -- closed in close()
        self._idx = open(self.idx_path, "w")  # noqa: SIM115
        self.count = 0

    def write(self, key: int, payload: bytes) -> int:
        """Append one record; return its byte offset."""
        offset = self._rec.tell()
        self._rec.write(frame(payload))
        self._idx.write(f"{key}\t{offset}\n")
        self.count += 1
        return offset

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(buf: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    """Scan a whole .rec sequentially (no index); yield (offset, payload)."""
    pos = 0
    while pos < len(buf):
        payload, nxt = read_at(buf, pos)
        yield pos, payload
        pos = nxt


def iter_offsets(buf: bytes | memoryview | np.ndarray) -> Iterator[int]:
    """Offsets of the records of a whole .rec in file order, checking framing only.

    The ``RecordError`` of a bad record names its byte offset; every offset before it is good.
    """
    pos = 0
    while pos < len(buf):
        nxt = record_spans(buf, pos)[1]
        yield pos
        pos = nxt


def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse a text ``.idx`` into int64 (keys, offsets), keeping file order.

    numpy's text parser handles 42M lines in seconds; on malformed input we re-parse line by
    line only to name the offending line.
    """
    with open(idx_path) as f:
        text = f.read()
    try:
        flat = np.fromstring(text, dtype=np.int64, sep=" ")
        if flat.size % 2 == 0:
            return flat[0::2].copy(), flat[1::2].copy()
    except ValueError:
        pass
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if fields and (len(fields) != 2 or not all(f.lstrip("-").isdigit() for f in fields)):
            raise RecordError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line!r}")
    raise RecordError(f"{idx_path}: could not parse the index")
