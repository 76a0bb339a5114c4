"""A lost ``.idx``: rebuilt byte for byte by ``data_pipelines.index``, and named in one line by
``check`` and ``build_loader`` instead of a traceback."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from data_pipelines import DataConfig, DataError, build_loader, check, index, recordio
from data_pipelines.faces import generate
from data_pipelines.pack import pack
from tests.test_data_helpers import image_jpeg, make_folder, make_im2rec


def _packed(tmp_path: Path) -> Path:
    """A packed set (header, 13 images, 4 identity records) with one record split at a magic."""
    make_folder(tmp_path / "src", 12, per_id=3)
    jpeg = image_jpeg(50)
    (tmp_path / "src" / "id_001" / "magic.jpg").write_bytes(
        jpeg[:200] + recordio.MAGIC_BYTES + jpeg[200:]
    )
    prefix = tmp_path / "out" / "train"
    pack(str(tmp_path / "src"), str(prefix), workers=1)
    return prefix


def test_rebuilt_index_is_byte_identical_to_the_one_pack_wrote(tmp_path: Path, capsys) -> None:
    prefix = _packed(tmp_path)
    idx = Path(f"{prefix}.idx")
    original = idx.read_bytes()
    assert original.count(b"\n") == 1 + 13 + 4
    idx.unlink()
    assert index.main([f"{prefix}.rec"]) == 0
    assert idx.read_bytes() == original
    assert capsys.readouterr().out == f"indexed 18 records of {prefix}.rec into {prefix}.idx\n"
    assert sorted(p.name for p in idx.parent.iterdir()) == [
        "property",
        "train.idx",
        "train.labels.json",
        "train.rec",
    ]  # no temporary file left behind


@pytest.mark.parametrize("layout", ["synth", "im2rec"])
def test_rebuilt_index_matches_other_writers(tmp_path: Path, layout: str) -> None:
    prefix = tmp_path / "train"
    if layout == "synth":
        generate(str(prefix), ids=3, per_id=4, seed=1, workers=1)
    else:
        make_im2rec(prefix, 9, per_id=3)
    idx = Path(f"{prefix}.idx")
    original = idx.read_bytes()
    idx.unlink()
    count = index.rebuild_index(prefix)  # a bare prefix works too
    assert idx.read_bytes() == original
    assert count == (1 + 12 + 3 if layout == "synth" else 9)


def test_existing_index_is_kept_unless_force(tmp_path: Path, capsys) -> None:
    make_im2rec(tmp_path / "train", 6, per_id=2)
    idx = tmp_path / "train.idx"
    original = idx.read_bytes()
    idx.write_text("0\t0\n")  # a stale index
    assert index.main([str(tmp_path / "train.rec")]) == 2
    assert capsys.readouterr().err == f"error: {idx} exists; pass --force to replace it\n"
    assert idx.read_text() == "0\t0\n"
    assert index.main([str(tmp_path / "train.rec"), "--force"]) == 0
    assert idx.read_bytes() == original


@pytest.mark.parametrize("how", ["truncate", "magic"])
def test_corrupt_rec_stops_at_the_byte_offset_and_writes_nothing(
    tmp_path: Path, capsys, how: str
) -> None:
    prefix = tmp_path / "train"
    make_im2rec(prefix, 10, per_id=2)
    _, offsets = recordio.read_index(f"{prefix}.idx")
    off = int(offsets[7])
    rec = Path(f"{prefix}.rec")
    data = rec.read_bytes()
    if how == "truncate":
        rec.write_bytes(data[: off + 40])
        length = struct.unpack_from("<I", data, off + 4)[0] & recordio.MAX_PART
        why = f"truncated record at byte {off}: needs {length} bytes, 32 left in the file"
    else:
        rec.write_bytes(data[:off] + b"\0" + data[off + 1 :])
        why = f"bad magic 0xced72300 at byte {off}"
    Path(f"{prefix}.idx").unlink()
    assert index.main([str(rec)]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last == f"error: {rec}: {why}; 7 good record(s) before it; no index written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.rec"]


def test_missing_rec_is_one_line(tmp_path: Path, capsys) -> None:
    assert index.main([str(tmp_path / "none.rec")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.rec'} not found\n"


def test_check_names_a_missing_index_and_how_to_rebuild_it(tmp_path: Path, capsys) -> None:
    make_im2rec(tmp_path / "train", 6, per_id=2)
    (tmp_path / "train.idx").unlink()
    code = check.main([str(tmp_path / "train"), "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    rec = tmp_path / "train.rec"
    assert err == (
        f"error: {tmp_path / 'train.idx'} not found; "
        f"rebuild it with `python -m data_pipelines.index {rec}`\n"
    )


def _load(tmp_path: Path, **kw) -> None:
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), num_threads=1, **kw)
    build_loader(cfg, batch_size=2, rank=0, world_size=1, device="cpu")


def test_loader_raises_one_line_data_errors_naming_the_path(tmp_path: Path) -> None:
    make_im2rec(tmp_path / "train", 6, per_id=2)
    (tmp_path / "train.idx").unlink()
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    cases = [
        (
            {"path": str(tmp_path / "train")},
            f"{idx} not found; rebuild it with `python -m data_pipelines.index {rec}`",
        ),
        (
            {"path": str(tmp_path / "nope")},
            f"{tmp_path / 'nope.rec'} not found (expected PREFIX.rec and PREFIX.idx)",
        ),
        (
            {"path": str(tmp_path)},  # a folder given as a .rec prefix
            f"{tmp_path}.rec not found (expected PREFIX.rec and PREFIX.idx); "
            "for a folder of identity folders set data.source: folder",
        ),
        (
            {"path": str(tmp_path / "nope"), "source": "folder"},
            f"{tmp_path / 'nope'} is not a directory of identity folders",
        ),
    ]
    for kw, message in cases:
        with pytest.raises(DataError) as err:
            _load(tmp_path, **kw)
        assert str(err.value) == message
    idx.write_text("0\t0\nnot an index line\n")
    with pytest.raises(DataError) as err:
        _load(tmp_path, path=str(tmp_path / "train"))
    assert str(err.value) == f"{idx}:2: expected 'key<TAB>offset', got 'not an index line'"
