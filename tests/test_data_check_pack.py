"""pack -> our reader -> DALI reader round trip, and ``check`` on clean and corrupt files."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def

from data_pipelines import check, recordio
from data_pipelines.config import DataConfig
from data_pipelines.jpeg import encode_jpeg, image_size
from data_pipelines.pack import pack
from data_pipelines.scan import scan_rec
from data_pipelines.sources import RecDataset
from tests.test_data_helpers import image_jpeg, make_folder, make_im2rec, make_insightface


def _folder_multiset(root: Path) -> Counter:
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    return Counter((names.index(f.parent.name), f.read_bytes()) for f in root.glob("*/*.jpg"))


def _ours(prefix: Path) -> Counter:
    scan = scan_rec(prefix)
    buf = (prefix.parent / (prefix.name + ".rec")).read_bytes()
    return Counter((int(lab), bytes(scan.image_bytes(buf, i))) for i, lab in enumerate(scan.labels))


def _dali(prefix: Path, index_path: str, n: int) -> Counter:
    @pipeline_def
    def raw():
        jpegs, labels = fn.readers.mxnet(path=[f"{prefix}.rec"], index_path=[index_path])
        return jpegs, labels

    pipe = raw(batch_size=n, num_threads=1, device_id=None)
    pipe.build()
    jpegs, labels = pipe.run()
    return Counter(
        (int(np.asarray(labels[i])[0]), np.asarray(jpegs[i]).tobytes()) for i in range(n)
    )


def test_pack_round_trip_through_our_reader_and_dali(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", 30, per_id=4)
    # one image whose bytes hold the RecordIO magic at an aligned offset: a split record
    special = tmp_path / "src" / "id_000" / "img_magic.jpg"
    jpeg = image_jpeg(99)
    special.write_bytes(jpeg[:200] + recordio.MAGIC_BYTES + jpeg[200:])
    expected = _folder_multiset(tmp_path / "src")
    n, sizes = pack(str(tmp_path / "src"), str(tmp_path / "out" / "train"), workers=1)
    assert (n, dict(sizes)) == (31, {(112, 112): 31})
    prefix = tmp_path / "out" / "train"
    assert _ours(prefix) == expected
    dataset = RecDataset(DataConfig(path=str(prefix), cache_dir=str(tmp_path / "cache")))
    assert dataset.num_images == 31 and dataset.num_classes == 8
    assert (dataset.scan.image_start == -1).sum() == 1  # the split record took the slow path
    assert _dali(prefix, dataset.image_index(), 31) == expected
    assert (prefix.parent / "property").read_text() == "8,112,112\n"
    label_map = json.loads((tmp_path / "out" / "train.labels.json").read_text())
    assert label_map["classes"] == [f"id_{c:03d}" for c in range(8)]


def test_pack_shuffles_with_a_seed_and_sorted_keeps_insightface_ranges(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", 12, per_id=3)
    orders = {}
    for name, kw in (
        ("a", {"seed": 0}),
        ("b", {"seed": 0}),
        ("c", {"seed": 1}),
        ("s", {"shuffle": False}),
    ):
        pack(str(tmp_path / "src"), str(tmp_path / name / "train"), workers=1, **kw)
        orders[name] = scan_rec(tmp_path / name / "train").labels.tolist()
    assert orders["a"] == orders["b"] != orders["c"]
    assert orders["s"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    buf = (tmp_path / "s" / "train.rec").read_bytes()
    records = dict(
        zip(*[x.tolist() for x in recordio.read_index(tmp_path / "s" / "train.idx")], strict=True)
    )
    header = recordio.unpack_payload(recordio.read_at(buf, records[0])[0])
    assert header[0].flag == 2 and header[1] == (13.0, 17.0) and header[2] == b""
    for c in range(4):
        _, (start, end), image = recordio.unpack_payload(recordio.read_at(buf, records[13 + c])[0])
        assert image == b"" and (start, end) == (1 + 3 * c, 4 + 3 * c)
        for key in range(int(start), int(end)):
            assert recordio.unpack_payload(recordio.read_at(buf, records[key])[0])[1] == (float(c),)


def test_pack_resize_reencodes_to_112(tmp_path: Path) -> None:
    (tmp_path / "src" / "alice").mkdir(parents=True)
    big = np.zeros((80, 64, 3), np.uint8)
    (tmp_path / "src" / "alice" / "a.jpg").write_bytes(encode_jpeg(big))
    pack(str(tmp_path / "src"), str(tmp_path / "plain"), workers=1)
    pack(str(tmp_path / "src"), str(tmp_path / "small"), workers=1, resize=True)
    for name, size in (("plain", (64, 80)), ("small", (112, 112))):
        scan = scan_rec(tmp_path / name)
        assert image_size(scan.image_bytes((tmp_path / f"{name}.rec").read_bytes(), 0)) == size


def _run_check(capsys, *args: str) -> tuple[int, list[str]]:
    code = check.main([*args, "--workers", "1"])
    return code, capsys.readouterr().out.splitlines()


def test_check_clean_insightface_file(tmp_path: Path, capsys) -> None:
    make_insightface(tmp_path / "train", 40, per_id=5)
    code, lines = _run_check(capsys, str(tmp_path / "train.rec"), "--full")
    assert code == 0
    assert lines == ["images=40 classes=8 min_label=0 max_label=7 decoded=40 problems=0"]


def test_check_reports_each_problem_with_key_and_offset(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "train"
    make_insightface(prefix, 40, per_id=5)
    keys, offsets = recordio.read_index(f"{prefix}.idx")
    off = dict(zip(keys.tolist(), offsets.tolist(), strict=True))
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(off[3])
        f.write(b"\x0b")  # flip the magic's first byte
        f.seek(off[7] + 8 + 4)
        f.write(struct.pack("<f", 2.5))  # non-integer label
        f.seek(off[9] + 8 + 4)
        f.write(struct.pack("<f", 8.0))  # label == declared class count (property: 8)
        f.seek(off[12] + 8 + recordio.IR_SIZE)
        f.write(b"\0" * 64)  # destroy the JPEG header
    code, lines = _run_check(capsys, str(prefix), "--full")
    assert code == 1
    assert lines[0] == "images=38 classes=8 min_label=0 max_label=8 decoded=38 problems=4"
    assert sorted(lines[1:]) == sorted(
        [
            f"ERROR bad_magic: key=3 offset={off[3]}: magic is not 0xced7230a",
            f"ERROR bad_label: key=7 offset={off[7]}: label 2.5 is not an integer >= 0",
            f"ERROR label_range: key=9 offset={off[9]}: label 8 >= num_classes 8",
            f"ERROR decode: key=12 offset={off[12]}: not an image Pillow can identify",
        ]
    )


def test_check_reports_truncated_tail_and_samples_decode(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "train"
    make_im2rec(prefix, 20, per_id=4)  # no header: the last record is an image
    _, offsets = recordio.read_index(f"{prefix}.idx")
    rec = Path(f"{prefix}.rec")
    rec.write_bytes(rec.read_bytes()[: int(offsets[-1]) + 100])
    code, lines = _run_check(capsys, str(prefix), "--sample", "5")
    assert code == 1
    assert lines[0] == "images=19 classes=5 min_label=0 max_label=4 decoded=5 problems=1"
    assert (
        lines[1]
        == f"ERROR truncated: key=19 offset={int(offsets[-1])}: record extends past the end of the file"
    )


def test_check_folder(tmp_path: Path, capsys) -> None:
    make_folder(tmp_path / "faces", 9, per_id=3)
    (tmp_path / "faces" / "id_001" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "faces" / "id_009").mkdir()
    code, lines = _run_check(capsys, str(tmp_path / "faces"), "--full")
    assert code == 1
    assert lines == [
        "images=10 classes=4 min_label=0 max_label=2 decoded=10 problems=1",
        "WARNING identity folder 'id_009' holds no images",
        "ERROR decode: key=id_001/broken.jpg: not an image Pillow can identify",
    ]


def test_check_reports_an_offset_listed_twice(tmp_path: Path, capsys) -> None:
    make_im2rec(tmp_path / "train", 6, per_id=2)
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([*lines, "99\t" + lines[2].split("\t")[1]]) + "\n")
    code, out = _run_check(capsys, str(tmp_path / "train"), "--full")
    assert code == 1
    assert out[0] == "images=6 classes=3 min_label=0 max_label=2 decoded=6 problems=1"
    assert (
        out[1]
        == f"ERROR duplicate: key=99 offset={lines[2].split(chr(9))[1]}: offset listed twice in the index"
    )


def test_check_lists_the_first_20_problems_unless_all(tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "train"
    make_im2rec(prefix, 40, per_id=4)
    _, offsets = recordio.read_index(f"{prefix}.idx")
    rec = Path(f"{prefix}.rec")
    rec.write_bytes(rec.read_bytes()[: int(offsets[5]) + 20])  # records 5..39 are cut off
    past = [
        f"ERROR truncated: key={k} offset={int(offsets[k])}: record header lies past the end of the file"
        for k in range(6, 40)
    ]
    cut = (
        f"ERROR truncated: key=5 offset={int(offsets[5])}: record extends past the end of the file"
    )
    summary = "images=5 classes=2 min_label=0 max_label=1 decoded=5 problems=35"
    code, lines = _run_check(capsys, str(prefix), "--full")
    assert code == 1
    assert lines == [summary, *past[:20], "... and 15 more; --all lists every one"]
    code, lines = _run_check(capsys, str(prefix), "--full", "--all")
    assert code == 1
    assert lines == [summary, *past, cut]
