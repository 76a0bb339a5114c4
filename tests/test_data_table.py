"""The index table: from insightface's identity records (no image record read) or from every
record, checked against a plain sequential read of the whole ``.rec``; bad layouts named."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import DataConfig, DataError, build_loader, check, layout, recordio
from data_pipelines.cache import build_table, open_index
from data_pipelines.layout import LayoutError
from data_pipelines.recordio import MAGIC_BYTES, RecordWriter, pack_payload
from data_pipelines.table import open_table
from tests.test_data_helpers import decode_ids, image_jpeg, make_im2rec


def write_layout(
    prefix: Path,
    sizes: list[int],
    *,
    ranges: list[tuple[float, float]] | None = None,
    header: tuple[float, float] | None = None,
    image=lambda i: b"img%d" % i,
) -> np.ndarray:
    """insightface layout with identity ``c`` holding ``sizes[c]`` images (0 allowed); returns
    the image labels in file order. ``ranges``/``header`` override what the records say."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    first_id = labels.size + 1
    starts = 1 + np.r_[0, np.cumsum(sizes)[:-1]]
    ranges = ranges or [(float(s), float(s + k)) for s, k in zip(starts, sizes, strict=True)]
    header = header or (float(first_id), float(first_id + len(sizes)))
    with RecordWriter(prefix) as w:
        w.write(0, pack_payload(header, b""))
        for i, label in enumerate(labels.tolist()):
            w.write(i + 1, pack_payload(float(label), image(i)))
        for c, rng in enumerate(ranges):
            w.write(first_id + c, pack_payload(tuple(map(float, rng)), b""))
    return labels


def reference(prefix: Path) -> tuple[list[int], list[int], list[int], list[bytes]]:
    """(keys, offsets, labels, image bytes) of the image records from a plain sequential read."""
    keys, offsets = recordio.read_index(f"{prefix}.idx")
    key_at = dict(zip(offsets.tolist(), keys.tolist(), strict=True))
    out: tuple[list, list, list, list] = ([], [], [], [])
    for offset, payload in recordio.iter_records(Path(f"{prefix}.rec").read_bytes()):
        _, labels, image = recordio.unpack_payload(payload)
        if image:
            for column, value in zip(
                out, (key_at[offset], offset, int(labels[0]), image), strict=True
            ):
                column.append(value)
    return out


def _same_as_reference(scan, prefix: Path) -> None:
    keys, offsets, labels, images = reference(prefix)
    assert scan.keys.tolist() == keys and scan.offsets.tolist() == offsets
    assert scan.labels.tolist() == labels
    buf = Path(f"{prefix}.rec").read_bytes()
    assert [bytes(scan.image_bytes(buf, i)) for i in range(scan.num_images)] == images


@pytest.mark.parametrize(
    "sizes",
    [[4, 4, 4], [1, 3, 0, 5, 2], [7], [0, 2, 0, 0, 3, 0]],
    ids=["even", "uneven", "one", "empty"],
)
def test_table_from_identity_records_matches_a_full_read(tmp_path: Path, sizes: list) -> None:
    prefix = tmp_path / "train"
    split = sum(sizes) // 2  # one image holds the RecordIO magic at an aligned offset
    write_layout(
        prefix,
        sizes,
        image=lambda i: (b"abcd" + MAGIC_BYTES + b"ef") if i == split else b"x" * (i % 5 + 1),
    )
    fast = open_index(prefix, tmp_path / "cache")
    assert fast.layout == "insightface" and fast.records_read == 1 + len(sizes)
    assert fast.image_start is None and fast.labels.dtype == np.int32
    assert fast.header_range == (sum(sizes) + 1, sum(sizes) + 1 + len(sizes))
    assert fast.declared_classes == len(sizes) and fast.problems == []
    _same_as_reference(fast, prefix)
    full = open_index(prefix, tmp_path / "cache", full=True)
    assert full.layout == "scanned" and full.records_read == 1 + sum(sizes) + len(sizes)
    _same_as_reference(full, prefix)


@pytest.mark.parametrize("how", ["count_records", "no_header", "keys_shuffled"])
def test_files_without_ranges_are_scanned_record_by_record(tmp_path: Path, how: str) -> None:
    prefix = tmp_path / "train"
    if how == "count_records":  # pack's shuffled files: identity records hold (identity, count)
        write_layout(prefix, [2, 3, 1], ranges=[(0, 2), (1, 3), (2, 1)])
    elif how == "no_header":
        make_im2rec(prefix, 9, per_id=3)
    else:
        write_layout(prefix, [2, 3, 1])
        lines = Path(f"{prefix}.idx").read_text().splitlines()
        lines[2], lines[3] = lines[3], lines[2]  # still every record, keys out of order
        Path(f"{prefix}.idx").write_text("\n".join(lines) + "\n")
    scan = open_index(prefix, tmp_path / "cache")
    assert scan.layout == "scanned"
    _same_as_reference(scan, prefix)


def test_cold_start_reads_the_idx_header_and_identity_records_only(
    tmp_path: Path, monkeypatch
) -> None:
    """Every image record's header is destroyed: the table is still right, because none is read."""
    prefix = tmp_path / "train"
    labels = write_layout(prefix, [3, 1, 4, 2])
    _, offsets = recordio.read_index(f"{prefix}.idx")
    images = offsets[1 : 1 + labels.size]
    with open(f"{prefix}.rec", "r+b") as f:
        for off in images.tolist():
            f.seek(off)
            f.write(b"\0" * 12)  # magic, lrec and the IRHeader flag: unreadable
    read: list[int] = []
    gather = recordio.gather_heads
    monkeypatch.setattr(
        recordio, "gather_heads", lambda buf, offs: read.extend(offs.tolist()) or gather(buf, offs)
    )
    scan = open_index(prefix, tmp_path / "cache")
    assert scan.layout == "insightface" and scan.records_read == 1 + 4
    assert scan.labels.tolist() == labels.tolist() and scan.offsets.tolist() == images.tolist()
    assert sorted(set(read)) == sorted({0, *offsets[1 + labels.size :].tolist()})
    with pytest.raises(recordio.BadRecord, match="magic is not 0xced7230a"):
        scan.image_bytes(Path(f"{prefix}.rec").read_bytes(), 0)
    full = open_index(prefix, tmp_path / "cache", full=True)  # a full scan does read them all
    assert full.num_images == 0 and len(full.problems) == labels.size


def _rec_messages(tmp_path: Path) -> Path:
    prefix = tmp_path / "train"
    write_layout(prefix, [2, 3, 2, 1])  # keys: 0 header, 1..8 images, 9..12 identities
    return prefix


def _offset(prefix: Path, key: int) -> int:
    keys, offsets = recordio.read_index(f"{prefix}.idx")
    return int(offsets[keys.tolist().index(key)])


def test_bad_layouts_are_one_line_naming_the_record(tmp_path: Path) -> None:
    cases = {}
    # a truncated .idx: its last two lines lost
    p = tmp_path / "cut_lines" / "train"
    write_layout(p, [2, 3, 2, 1])
    idx = Path(f"{p}.idx")
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[:-2]))
    cases[p] = (
        f"{p}.rec: header record key=0 offset=0: says the file holds 13 records (images 1..8, "
        f"identity records 9..12) but {idx} lists 11: a truncated .idx, or one of another file"
    )
    # a truncated .idx: cut mid-line
    p = tmp_path / "cut_mid" / "train"
    write_layout(p, [2, 3, 2, 1])
    idx = Path(f"{p}.idx")
    idx.write_bytes(idx.read_bytes()[:-3])
    cases[p] = (
        f"{idx}: the last line has no newline: the .idx is cut short; rebuild it with "
        f"`python -m data_pipelines.index {p}.rec --force`"
    )
    # identity ranges that overlap, or leave a gap
    p = tmp_path / "overlap" / "train"
    write_layout(p, [2, 3, 2, 1], ranges=[(1, 3), (3, 6), (5, 8), (8, 9)])
    cases[p] = (
        f"{p}.rec: identity record key=11 offset={_offset(p, 11)}: range [5, 8) overlaps the "
        "previous identity's [3, 6)"
    )
    p = tmp_path / "gap" / "train"
    write_layout(p, [2, 3, 2, 1], ranges=[(1, 3), (3, 5), (6, 8), (8, 9)])
    cases[p] = (
        f"{p}.rec: identity record key=11 offset={_offset(p, 11)}: range [6, 8) leaves keys "
        "[5, 6) after the previous identity's [3, 5) without an identity"
    )
    p = tmp_path / "past" / "train"
    write_layout(p, [2, 3, 2, 1], ranges=[(1, 3), (3, 6), (6, 8), (8, 10)])
    cases[p] = (
        f"{p}.rec: identity record key=12 offset={_offset(p, 12)}: range [8, 10) ends the "
        "identities, but it runs past key 8, the last image record"
    )
    # a header that disagrees with the identity records / the .idx
    p = tmp_path / "header_late" / "train"
    write_layout(p, [2, 3, 2, 1], header=(10, 13))
    cases[p] = (
        f"{p}.rec: identity record key=10 offset={_offset(p, 10)}: range [3, 6) of the first "
        "identity does not start at key 1, the first image (the header record, key 0, puts "
        "identity records at 10..12)"
    )
    p = tmp_path / "header_early" / "train"
    write_layout(p, [2, 3, 2, 1], header=(8, 13))
    cases[p] = (
        f"{p}.rec: header record key=0 offset=0: puts identity records at keys 8.., but record "
        f"key=8 offset={_offset(p, 8)} holds an image"
    )
    p = tmp_path / "header_count" / "train"
    write_layout(p, [2, 3, 2, 1], header=(9, 14))
    cases[p] = (
        f"{p}.rec: header record key=0 offset=0: says the file holds 14 records (images 1..8, "
        f"identity records 9..13) but {p}.idx lists 13: a truncated .idx, or one of another file"
    )
    # the .rec goes on past the last record the .idx lists
    p = tmp_path / "tail" / "train"
    write_layout(p, [2, 3, 2, 1])
    rec = Path(f"{p}.rec")
    size = rec.stat().st_size
    with open(rec, "ab") as f:
        f.write(recordio.frame(pack_payload(3.0, b"unlisted")))
    cases[p] = (
        f"{rec}: the last record {p}.idx lists (key 12, offset {_offset(p, 12)}) ends at byte "
        f"{size} but the file holds {rec.stat().st_size} bytes: the .idx is truncated or belongs "
        "to another file"
    )
    for prefix, message in cases.items():
        with pytest.raises(LayoutError) as err:
            open_index(prefix, tmp_path / "cache")
        assert str(err.value) == message
        assert "\n" not in message
        with pytest.raises(DataError) as err:  # the trainer's seam says the same
            build_loader(
                DataConfig(path=str(prefix), cache_dir=str(tmp_path / "cache"), num_threads=1),
                batch_size=2,
                rank=0,
                world_size=1,
                device="cpu",
            )
        assert str(err.value) == message
    assert (
        sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == []
    )


def test_an_unreadable_identity_record_falls_back_to_the_scan_which_names_it(
    tmp_path: Path,
) -> None:
    prefix = _rec_messages(tmp_path)
    off = _offset(prefix, 11)
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(off)
        f.write(b"\0")
    scan = open_index(prefix, tmp_path / "cache")
    assert scan.layout == "scanned" and scan.num_images == 8
    assert [str(p) for p in scan.problems] == [
        f"bad_magic: key=11 offset={off}: magic is not 0xced7230a"
    ]


def _loader(prefix: Path, tmp_path: Path, **kw):
    cfg = DataConfig(path=str(prefix), cache_dir=str(tmp_path / "cache"), num_threads=1, **kw)
    return build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu", seed=3)


def test_a_bad_image_record_is_refused_when_read_or_replaced_with_skip_corrupt(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "train"
    labels = write_layout(prefix, [4, 4, 4, 4], image=image_jpeg)
    off = _offset(prefix, 6)  # image 5
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(off + 1)
        f.write(b"\x99")
    loader = _loader(prefix, tmp_path, shuffle=False)
    assert loader.num_images == 16 and loader.skipped == 0  # nothing read yet
    with pytest.raises(DataError) as err:
        list(loader)
    assert str(err.value) == (
        f"{prefix}.rec: bad_magic: key=6 offset={off}: magic is not 0xced7230a (found when read; "
        "set data.skip_corrupt: true to train past bad records, or list them all with "
        f"`python -m data_pipelines.check {prefix} --full`)"
    )
    loader = _loader(prefix, tmp_path, skip_corrupt=True, last_batch="pad")
    ids, got = [], []
    for images, lab in loader:
        ids.append(decode_ids(images))
        got.append(lab.numpy())
    ids, got = np.concatenate(ids), np.concatenate(got)
    assert loader.skipped == 1 and sorted(ids.tolist()) == sorted([*range(5), *range(6, 16), 6])
    assert 5 not in ids.tolist() and (got == labels[ids]).all()  # image 6 in 5's place, its label
    # resume: the replacement is a function of the file, so a resumed loader continues exactly
    first = _loader(prefix, tmp_path, skip_corrupt=True, last_batch="pad")
    it = iter(first)
    next(it)
    state = first.state_dict()
    want = [decode_ids(x).tolist() for x, _ in it]
    again = _loader(prefix, tmp_path, skip_corrupt=True, last_batch="pad")
    again.load_state_dict(state)
    assert [decode_ids(x).tolist() for x, _ in again] == want


def test_native_reader_with_skip_corrupt_scans_so_dali_never_sees_a_bad_record(
    tmp_path: Path,
) -> None:
    prefix = tmp_path / "train"
    write_layout(prefix, [4, 4, 4], image=image_jpeg)
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(_offset(prefix, 2))
        f.write(b"\0")
    loader = _loader(prefix, tmp_path, reader="native", skip_corrupt=True, last_batch="pad")
    assert (loader.skipped, loader.num_images) == (1, 11)  # left out up front, as for any layout
    assert loader.dataset.scan.layout == "scanned"
    ids = np.concatenate([decode_ids(x)[: loader.valid] for x, _ in loader])
    assert sorted(ids.tolist()) == [0, *range(2, 12)]
    fast = _loader(prefix, tmp_path, reader="native")  # without skip_corrupt: the layout index
    assert fast.dataset.scan.layout == "insightface" and fast.num_images == 12


def test_a_label_disagreeing_with_its_identity_record_is_refused_when_read(tmp_path: Path) -> None:
    prefix = tmp_path / "train"
    write_layout(prefix, [4, 4], image=image_jpeg)
    off = _offset(prefix, 3)
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(off + 8 + 4)
        f.write(struct.pack("<f", 1.0))  # identity 0's range holds key 3
    with pytest.raises(
        DataError,
        match=rf"label_mismatch: key=3 offset={off}: the record's label is 1 but its identity record gives 0",
    ):
        list(_loader(prefix, tmp_path, shuffle=False))


def test_check_samples_the_image_records_and_full_reads_them_all(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "train"
    write_layout(prefix, [5, 5, 5, 5], image=image_jpeg)
    bad = _offset(prefix, 4)
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(bad)
        f.write(b"\0")
    assert check.main([str(prefix), "--sample", "3", "--workers", "1", "--seed", "1"]) in (0, 1)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("images=20 classes=4 min_label=0 max_label=3 decoded=3")
    assert check.main([str(prefix), "--sample", "30", "--workers", "1"]) == 1  # all 20 sampled
    assert capsys.readouterr().out.splitlines() == [
        "images=20 classes=4 min_label=0 max_label=3 decoded=20 problems=1",
        f"ERROR bad_magic: key=4 offset={bad}: magic is not 0xced7230a",
    ]
    assert check.main([str(prefix), "--full", "--workers", "1"]) == 1  # the scan drops it
    assert capsys.readouterr().out.splitlines() == [
        "images=19 classes=4 min_label=0 max_label=3 decoded=19 problems=1",
        f"ERROR bad_magic: key=4 offset={bad}: magic is not 0xced7230a",
    ]


# -- float32 ranges beyond key 2^24 ----------------------------------------------------------
def test_bounds_are_the_integers_float32_rounds_to_each_value() -> None:
    values = np.unique(
        np.r_[5.0, 2.0**24, 2.0**25, np.random.default_rng(0).integers(2**24, 2**27, 300)]
        .astype(np.float32)
        .astype(np.float64)
    )
    lo, hi = layout._bounds(values)
    for v, a, b in zip(values, lo, hi, strict=True):
        cand = np.arange(int(v) - 20, int(v) + 21)
        exact = cand[cand.astype(np.float32) == np.float32(v)]
        assert (a, b) == (exact.min(), exact.max())


def test_rounded_ranges_resolve_to_each_records_own_label() -> None:
    """Identity bounds past 2^24 stored as float32 (as insightface's files do): the few keys
    they leave open are read, and every key gets the label its record holds."""
    rng = np.random.default_rng(4)
    base = 2**25 - 300  # identity 0 holds keys 1..base-1; then 400 small identities, some empty
    sizes = np.r_[base - 1, rng.integers(0, 7, 400)]
    true_starts = 1 + np.r_[0, np.cumsum(sizes)[:-1]]
    first_id = 1 + int(sizes.sum())

    def truth(keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(true_starts, keys, side="right") - 1

    starts = true_starts.astype(np.float32).astype(np.float64)
    ends = (true_starts + sizes).astype(np.float32).astype(np.float64)
    layout._check_ranges("x.rec", starts, ends, first_id, np.zeros(sizes.size, np.int64))
    wkeys = layout.window_keys(starts, first_id)
    assert 0 < wkeys.size <= 4 * (starts >= layout.EXACT).sum()  # 1-4 open keys per bound
    wlabels = truth(wkeys)
    lo, hi = layout._bounds(starts)
    assert layout.check_window_labels(wkeys, wlabels, lo, hi) is None
    keys = np.arange(base - 400, first_id)
    naive = np.searchsorted(starts, keys, side="right") - 1
    assert (naive != truth(keys)).any()  # the floats alone would mislabel some images
    np.testing.assert_array_equal(layout.assign_labels(keys, starts, wkeys, wlabels), truth(keys))
    wrong = wlabels.copy()
    wrong[wkeys.size // 2] += 3  # a record whose label no rounding of the ranges allows
    assert layout.check_window_labels(wkeys, wrong, lo, hi)[0] == wkeys.size // 2


def test_open_keys_far_apart_are_read_a_page_each() -> None:
    """WebFace42M-like records (7 KB, a boundary every ~21 images) would pull most of the file
    in through the kernel's read-around; the benchmark's 36-byte records would not."""
    wkeys = np.sort(np.r_[np.arange(1, 10**6, 21), np.arange(2, 10**6, 21)])
    assert layout._sparse(7000 * np.arange(10**6), wkeys)
    assert not layout._sparse(36 * np.arange(10**6), wkeys)
    assert not layout._sparse(7000 * np.arange(10), np.array([3]))


# -- the .idx as a stream --------------------------------------------------------------------
def test_index_streams_in_blocks_and_formats_like_python(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 10**12, 3000)
    keys[:3] = [0, 9, 10]
    offsets = np.sort(rng.integers(0, 10**15, 3000))
    text = recordio.format_index(keys, offsets)
    assert text == "".join(f"{k}\t{o}\n" for k, o in zip(keys, offsets, strict=True)).encode()
    path = tmp_path / "x.idx"
    path.write_bytes(text)
    for block in (7, 64, 1000, 1 << 20):
        parts = list(recordio.iter_index(path, block=block))
        assert np.concatenate([k for k, _ in parts]).tolist() == keys.tolist()
        assert np.concatenate([o for _, o in parts]).tolist() == offsets.tolist()
    lines = text.decode().splitlines(keepends=True)
    lines[2500] = "12 34 56\n"
    path.write_text("".join(lines))
    for block in (64, 1 << 20):
        with pytest.raises(recordio.RecordError) as err:
            list(recordio.iter_index(path, block=block))
        assert str(err.value) == f"{path}:2501: expected 'key<TAB>offset', got '12 34 56'"
    path.write_text("0 5\n\n  1\t9  \n")  # spaces and blank lines are still read
    assert [x.tolist() for x in recordio.read_index(path)] == [[0, 1], [5, 9]]


def test_private_table_goes_with_its_object(tmp_path: Path) -> None:
    prefix = tmp_path / "train"
    write_layout(prefix, [2, 2])
    scan = open_index(prefix, None)
    where = Path(scan.table_dir).parent
    assert where.is_dir() and scan.num_images == 4
    del scan
    import gc

    gc.collect()
    assert not where.exists()


def test_a_table_without_its_meta_is_never_opened(tmp_path: Path) -> None:
    prefix = tmp_path / "train"
    write_layout(prefix, [2, 2])
    build_table(str(prefix), tmp_path / "t")
    assert open_table(tmp_path / "t", f"{prefix}.rec") is not None
    (tmp_path / "t" / "meta.json").unlink()
    assert open_table(tmp_path / "t", f"{prefix}.rec") is None


def test_the_benchmarks_vectorised_file_is_insightfaces_layout(tmp_path: Path) -> None:
    from pfc_ds.bench import index as bench_index

    prefix = tmp_path / "train"
    bench_index.write_test_file(str(prefix), 500, 37, seed=3)
    keys, offsets, labels, images = reference(prefix)  # the plain reader agrees with the writer
    starts = bench_index.identity_starts(500, 37, seed=3)
    assert keys == list(range(1, 501)) and set(images) == {b"\xff\xd8\xff\xd9"}
    assert labels == (np.searchsorted(starts, np.arange(1, 501), side="right") - 1).tolist()
    assert offsets == bench_index.image_offset(np.arange(1, 501)).tolist()
    fast = open_index(prefix, tmp_path / "cache")
    assert fast.layout == "insightface" and fast.declared_classes == 37
    assert bench_index.verify(fast, 500, 37, seed=3).startswith("all 500 keys")
    _same_as_reference(open_index(prefix, tmp_path / "cache", full=True), prefix)
