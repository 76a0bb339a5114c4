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

import contextlib
import math
import mmap
import os
import struct
import warnings
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


class BadRecord(RecordError):
    """A record found bad when it is read; ``kind`` and ``detail`` as in a scan's ``Problem``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


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


def image_record(buf: bytes | memoryview | np.ndarray, offset: int) -> tuple[float, memoryview]:
    """(label, JPEG bytes) of the image record at ``offset``, checking what a scan checks.

    The checks of ``scan`` for one record, at the moment it is read: framing, the IRHeader and
    its label floats, an integral label, image bytes present. Raises ``BadRecord``.
    """
    size = len(buf)
    if offset < 0 or offset + 8 > size:
        raise BadRecord("truncated", "record header lies past the end of the file")
    magic, lrec = _LREC.unpack_from(buf, offset)
    if magic != MAGIC:
        raise BadRecord("bad_magic", "magic is not 0xced7230a")
    cflag, length = decode_lrec(lrec)
    if cflag == 1:  # split around an embedded magic: the full reader joins the parts
        try:
            _, labels, image = unpack_payload(read_at(buf, offset)[0])
        except RecordError as exc:
            raise BadRecord("truncated", str(exc)) from exc
        label, view = labels[0], memoryview(image)
    elif cflag != 0:
        raise BadRecord("bad_magic", "index points into the middle of a split record")
    else:
        if offset + 8 + length > size:
            raise BadRecord("truncated", "record extends past the end of the file")
        if length < IR_SIZE:
            raise BadRecord("truncated", "payload shorter than the IRHeader")
        flag, label = struct.unpack_from("<If", buf, offset + 8)
        start = offset + 8 + IR_SIZE + 4 * flag
        if start > offset + 8 + length:
            raise BadRecord("truncated", "fewer label floats than the IRHeader flag promises")
        if flag > 0:
            label = struct.unpack_from("<f", buf, offset + 8 + IR_SIZE)[0]
        view = memoryview(buf)[start : offset + 8 + length]
    if len(view) == 0:
        raise BadRecord("not_image", "the record holds no image bytes")
    if not (math.isfinite(label) and label >= 0 and label == math.floor(label)):
        raise BadRecord("bad_label", f"label {float(label)!r} is not an integer >= 0")
    return float(label), view


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


# -- the .idx text file --------------------------------------------------------------------
_IDX_BLOCK = 1 << 24  # bytes of .idx text parsed per step: about 800k lines, ~40 MB of work


def iter_index(
    idx_path: str | os.PathLike, *, block: int = _IDX_BLOCK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Parse a text ``.idx`` block by block into int64 (keys, offsets), keeping file order.

    Streaming keeps a 42M-line index (0.85 GB of text) at a few tens of MB of memory. Each block
    is parsed by numpy's text reader; a block whose line structure is not ``key<TAB>offset``
    throughout is re-parsed line by line, which names the offending line (or accepts blank
    lines and other whitespace, as a plain ``split()`` would).
    """
    line = 1
    rest = b""
    with open(idx_path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield _parse_block(idx_path, data[:cut], line)
                line += data.count(b"\n", 0, cut)
    if rest.strip():  # a last line without its newline
        yield _parse_block(idx_path, rest, line)


def _parse_block(idx_path: str | os.PathLike, text: bytes, first_line: int):
    raw = np.frombuffer(text, dtype=np.uint8)
    tabs = np.flatnonzero(raw == 9)
    ends = np.flatnonzero(raw == 10)
    if text[-1:] != b"\n":  # the unterminated last line
        ends = np.r_[ends, raw.size]
    regular = (  # one tab inside every line, with a field on either side
        tabs.size == ends.size
        and bool((tabs > np.r_[-1, ends[:-1]] + 1).all())
        and bool((tabs < ends - 1).all())
    )
    if regular:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "could not be read to its end"
            try:
                flat = np.fromstring(text, dtype=np.int64, sep=" ")
            except ValueError:
                flat = np.zeros(0, np.int64)
        if flat.size == 2 * ends.size:
            return flat[0::2].copy(), flat[1::2].copy()
    keys, offsets = [], []
    for lineno, line in enumerate(text.decode("utf-8", "replace").splitlines(), first_line):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.lstrip("-").isdigit() for f in fields):
            raise RecordError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line!r}")
        keys.append(int(fields[0]))
        offsets.append(int(fields[1]))
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The whole text ``.idx`` as int64 (keys, offsets) in file order (``iter_index`` joined)."""
    parts = list(iter_index(idx_path))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([k for k, _ in parts]), np.concatenate([o for _, o in parts])


def index_ends_cleanly(idx_path: str | os.PathLike) -> bool:
    """Whether the ``.idx`` is empty or ends with a newline (a cut file ends mid-line)."""
    with open(idx_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def first_index_line(idx_path: str | os.PathLike) -> tuple[int, int] | None:
    """(key, offset) of the first ``.idx`` line, or None for an empty or malformed start."""
    with open(idx_path, "rb") as f:
        fields = f.readline().split()
    if len(fields) != 2 or not all(x.lstrip(b"-").isdigit() for x in fields):
        return None
    return int(fields[0]), int(fields[1])


def format_index(keys: np.ndarray, offsets: np.ndarray) -> bytes:
    """``key<TAB>offset`` lines for non-negative integer arrays, formatted with numpy ops.

    ``"%d\t%d\n" % ...`` per line takes minutes at 42M lines; this takes seconds. Call it
    on chunks (a 64k-line chunk uses about 25 MB).
    """
    keys = np.asarray(keys, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if keys.size == 0:
        return b""
    if keys.min() < 0 or offsets.min() < 0:
        return "".join(
            f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist(), strict=True)
        ).encode()
    kd, km = _digits(keys)
    od, om = _digits(offsets)
    n = keys.size
    tab = np.full((n, 1), 9, np.uint8)
    nl = np.full((n, 1), 10, np.uint8)
    chars = np.hstack([kd, tab, od, nl])
    keep = np.hstack([km, np.ones((n, 1), bool), om, np.ones((n, 1), bool)])
    return chars[keep].tobytes()


def _digits(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned ASCII digits of non-negative ``x`` and the mask of significant ones."""
    width = len(str(int(x.max())))
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = ((x[:, None] // powers) % 10 + 48).astype(np.uint8)
    count = np.maximum((x[:, None] >= powers).sum(axis=1), 1)
    return digits, np.arange(width)[None, :] >= width - count[:, None]


# -- vectorised record headers -------------------------------------------------------------
HEAD = np.dtype(
    [
        ("magic", "<u4"),
        ("lrec", "<u4"),
        ("flag", "<u4"),
        ("label", "<f4"),
        ("id", "<u8"),
        ("id2", "<u8"),
        ("label0", "<f4"),  # first of ``flag`` labels when flag > 0
        ("label1", "<f4"),  # second (an insightface header or identity record's range end)
    ]
)


def gather_heads(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``HEAD.itemsize`` bytes at each offset of ``buf`` (zero-filled past EOF) as ``HEAD``."""
    width = HEAD.itemsize
    pos = offsets[:, None] + np.arange(width, dtype=np.int64)
    inside = (pos >= 0) & (pos < buf.shape[0])
    raw = np.zeros(pos.shape, dtype=np.uint8)
    raw[inside] = buf[pos[inside]]
    return raw.view(HEAD).reshape(-1)


class FileMap:
    """A read-only map of a file whose pages this process can drop again (``release``).

    A scan reads a few bytes per record across a file of many GB. Through a plain memory map
    every page it touches stays in the process's resident set until unmapped, so the scan's
    RSS grows to the file's size; ``release`` after each chunk keeps it at one chunk's pages.
    The pages stay in the page cache, shared; only this process's mapping of them goes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 -- closed in close()
        self.size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self.array = np.frombuffer(self._mm, np.uint8) if self._mm else np.zeros(0, np.uint8)

    def advise(self, advice: int) -> None:
        """``madvise`` the whole map (``mmap.MADV_RANDOM``: fault in single pages)."""
        if self._mm is not None:
            self._mm.madvise(advice)

    def release(self, lo: int = 0, hi: int | None = None) -> None:
        """Drop this process's mapping of the pages covering bytes ``[lo, hi)``."""
        if self._mm is None:
            return
        hi = self.size if hi is None else min(hi, self.size)
        lo = max(lo, 0) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self.array = np.zeros(0, np.uint8)  # the buffer export must end before the map closes
        if self._mm is not None:
            # a view may outlive the map (an exception's frames); the map goes with it then
            with contextlib.suppress(BufferError):
                self._mm.close()
        self._file.close()

    def __enter__(self) -> FileMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
