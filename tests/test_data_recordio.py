"""RecordIO framing and insightface payloads, byte for byte against the dmlc format."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from data_pipelines import recordio
from data_pipelines.recordio import MAGIC, MAGIC_BYTES, RecordError


def _head(cflag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def test_frame_pads_to_four_bytes() -> None:
    assert recordio.frame(b"abcde") == _head(0, 5) + b"abcde" + b"\0\0\0"
    assert recordio.frame(b"abcd") == _head(0, 4) + b"abcd"
    assert recordio.frame(b"") == _head(0, 0)


def test_frame_splits_at_aligned_magic_only() -> None:
    payload = b"abcd" + MAGIC_BYTES + b"efg"
    assert recordio.frame(payload) == _head(1, 4) + b"abcd" + _head(3, 3) + b"efg" + b"\0"
    lead = MAGIC_BYTES + b"xyzw" + MAGIC_BYTES
    assert recordio.frame(lead) == _head(1, 0) + _head(2, 4) + b"xyzw" + _head(3, 0)
    unaligned = b"ab" + MAGIC_BYTES + b"cd"  # dmlc only checks 4-byte aligned words
    assert recordio.frame(unaligned) == _head(0, 8) + unaligned


@pytest.mark.parametrize(
    "payload",
    [b"", b"x", b"abcd" + MAGIC_BYTES + b"efg", MAGIC_BYTES * 3, b"12345678" + MAGIC_BYTES],
)
def test_read_at_inverts_frame(payload: bytes) -> None:
    buf = b"JUNK" + recordio.frame(payload) + recordio.frame(b"next")
    got, nxt = recordio.read_at(buf, 4)
    assert got == payload
    assert recordio.read_at(buf, nxt) == (b"next", len(buf))


def test_read_at_reports_bad_magic_and_truncation() -> None:
    rec = recordio.frame(b"hello world!")
    with pytest.raises(RecordError, match="bad magic 0x00000000 at byte 0"):
        recordio.read_at(b"\0\0\0\0" + rec[4:], 0)
    with pytest.raises(RecordError, match="truncated record at byte 0: needs 12 bytes, 5 left"):
        recordio.read_at(rec[:13], 0)
    with pytest.raises(RecordError, match="truncated record header"):
        recordio.read_at(rec[:5], 0)


def test_payload_round_trip_scalar_and_vector_labels() -> None:
    header, labels, image = recordio.unpack_payload(recordio.pack_payload(41.0, b"JPEG", id_=9))
    assert header == recordio.IRHeader(0, 41.0, 9, 0) and labels == (41.0,) and image == b"JPEG"
    header, labels, image = recordio.unpack_payload(recordio.pack_payload((3.0, 5.0), b""))
    assert header.flag == 2 and labels == (3.0, 5.0) and image == b""
    raw = recordio.pack_payload((1.0, 2.0, 3.0), b"img")
    assert len(raw) == recordio.IR_SIZE + 12 + 3
    with pytest.raises(RecordError, match="promises more labels"):
        recordio.unpack_payload(raw[: recordio.IR_SIZE + 4])


def test_writer_index_lists_offsets_and_iter_records_agrees(tmp_path) -> None:
    payloads = [recordio.pack_payload(float(i), bytes([i]) * (i * 3 + 1)) for i in range(6)]
    payloads[2] = recordio.pack_payload(2.0, b"abcd" + MAGIC_BYTES + b"tail")  # forces a split
    with recordio.RecordWriter(tmp_path / "d") as w:
        offsets = [w.write(10 + i, p) for i, p in enumerate(payloads)]
    keys, idx_offsets = recordio.read_index(tmp_path / "d.idx")
    assert keys.tolist() == [10 + i for i in range(6)]
    assert idx_offsets.tolist() == offsets
    buf = (tmp_path / "d.rec").read_bytes()
    assert list(recordio.iter_records(buf)) == list(zip(offsets, payloads, strict=True))
    assert offsets[0] == 0 and all(o % 4 == 0 for o in offsets)


def test_read_index_names_bad_line(tmp_path) -> None:
    (tmp_path / "x.idx").write_text("0\t0\n1\t40\nbad line here\n")
    with pytest.raises(RecordError, match=r"x.idx:3: expected 'key<TAB>offset'"):
        recordio.read_index(tmp_path / "x.idx")
    (tmp_path / "y.idx").write_text("")
    keys, offsets = recordio.read_index(tmp_path / "y.idx")
    assert keys.size == 0 and offsets.dtype == np.int64
