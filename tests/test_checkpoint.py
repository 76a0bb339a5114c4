"""The checkpoint package on its own (no trainer, no DeepSpeed ranks): checksums and file
records, tag discovery, ``open_checkpoint`` from every kind of path, verification, setting
aside, pruning, space checks with their structured errors, and restore plans."""

from __future__ import annotations

import json
import os
import zlib
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from pfc_ds.checkpoint import (
    CheckpointError,
    CheckpointRef,
    RestoreMode,
    head_shard_paths,
    integrity,
    layout,
    open_checkpoint,
    writer,
)
from pfc_ds.checkpoint.reader import verify
from pfc_ds.checkpoint.restore import plan_restore
from pfc_ds.checkpoint.shard_files import save_shard, shard_name

# ---- checksums and file records ---------------------------------------------------------------


def test_checksums_stream_in_blocks_and_match_one_shot(tmp_path, monkeypatch):
    import xxhash

    monkeypatch.setattr(integrity, "_BLOCK", 1000)  # many blocks and a partial last one
    data = os.urandom(12_345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert integrity.checksum(path, "xxh3_64") == xxhash.xxh3_64(data).hexdigest()
    assert integrity.checksum(path, "crc32") == f"{zlib.crc32(data):08x}"
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'"):
        integrity.checksum(path, "md5")


def test_a_missing_truncated_or_corrupt_file_is_named(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    path.write_bytes(bytes(range(256)) * 4)
    entry = integrity.record(path)
    assert entry == {
        "size": 1024,
        "algorithm": "xxh3_64",
        "checksum": integrity.checksum(path),
    }
    assert integrity.problem(tmp_path, path.name, entry) is None
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(raw))
    assert integrity.problem(tmp_path, path.name, entry) == (
        f"{path}: xxh3_64 {integrity.checksum(path)}, expected {entry['checksum']} (corrupt)"
    )
    path.write_bytes(bytes(raw[:1000]))
    assert integrity.problem(tmp_path, path.name, entry) == (
        f"{path}: 1000 bytes, expected 1024 (truncated)"
    )
    path.unlink()
    assert integrity.problem(tmp_path, path.name, entry) == f"{path}: missing"


# ---- tags: discovery, verification, pruning ---------------------------------------------------


def _tag(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / layout.CHECKPOINTS / layout.tag_for(step)
    folder.mkdir(parents=True)
    data = folder / "trainer_state_00000.pt"
    data.write_bytes(str(step).encode() * 100)
    if complete:
        meta = {"step": step, "world_size": 1, "zero_stage": 0,
                "files": {data.name: integrity.record(data)}}  # fmt: skip
        (folder / layout.META).write_text(json.dumps(meta))
    return folder


def test_candidates_are_complete_tags_newest_first_whatever_latest_says(tmp_path):
    for step in (5, 100, 20):
        _tag(tmp_path, step)
    _tag(tmp_path, 300, complete=False)  # a save cut short
    (tmp_path / layout.CHECKPOINTS / "step00000200.damaged").mkdir()
    (tmp_path / layout.CHECKPOINTS / layout.LATEST).write_text("step00000020\n")
    assert [ref.step for ref in layout.candidates(tmp_path)] == [100, 20, 5]
    assert [p.name for p in layout.incomplete(tmp_path)] == ["step00000300"]
    assert layout.candidates(tmp_path / "nothing") == []


def test_verify_names_the_damaged_file_and_set_aside_moves_the_tag(tmp_path):
    folder = _tag(tmp_path, 7)
    ref = open_checkpoint(folder)
    assert verify(ref) == []
    data = folder / "trainer_state_00000.pt"
    data.write_bytes(data.read_bytes()[:-1])
    assert verify(ref) == [f"{data}: 99 bytes, expected 100 (truncated)"]
    assert verify(CheckpointRef(folder, {"step": 7})) == [f"{folder}/meta.json lists no files"]
    moved = layout.set_aside(folder)
    assert moved.name == "step00000007.damaged" and not folder.exists()
    assert layout.candidates(tmp_path) == []


def test_prune_keeps_the_newest_latest_and_protected_tags_and_drops_cut_short_saves(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _tag(tmp_path, step)
    _tag(tmp_path, 9, complete=False)
    root = tmp_path / layout.CHECKPOINTS
    (root / layout.LATEST).write_text("step00000002\n")  # latest names an older tag
    layout.prune(root, keep_last=2, keep={"step00000001"})  # e.g. the tag resumed from
    assert sorted(p.name for p in root.glob("step*")) == [
        "step00000001",
        "step00000002",
        "step00000004",
        "step00000005",
    ]
    layout.prune(root, keep_last=0, keep=set())  # keep_last 0 keeps everything
    assert len(list(root.glob("step*"))) == 4


def test_space_short_reports_the_rank_and_its_free_bytes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    root = tmp_path / "out" / layout.CHECKPOINTS  # not created yet: its parent is asked
    assert writer.space_short(root, 4000) is None
    assert writer.space_short(root, 6000) == (0, 5000)
    assert writer.size_text(5000) == "5.0 KB" and writer.size_text(3.2e9) == "3.2 GB"
    # A save that cannot fit says so with fields, before writing anything.
    with pytest.raises(CheckpointError) as err:
        writer.save(None, None, {}, tmp_path / "out", 3, {}, need_bytes=6000)
    assert (err.value.free, err.value.need, err.value.rank) == (5000, 6000, 0)
    assert err.value.path == root and not (root / "step00000003").exists()


# ---- open_checkpoint: the one resolver -----------------------------------------------------


def test_open_checkpoint_takes_an_output_its_checkpoints_folder_or_a_tag(tmp_path):
    for step in (10, 30):
        _tag(tmp_path, step)
    _tag(tmp_path, 40, complete=False)
    root = tmp_path / layout.CHECKPOINTS
    for path in (tmp_path, root, root / "step00000030"):
        ref = open_checkpoint(path)
        assert (ref.step, ref.tag, ref.root) == (30, "step00000030", root)
    assert open_checkpoint(root / "step00000010").step == 10
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        open_checkpoint(root / "step00000040")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        open_checkpoint(tmp_path / "empty")
    ref = open_checkpoint(tmp_path)
    assert ref.trainer_state_path(1) == root / "step00000030" / "trainer_state_00001.pt"
    assert ref.universal == root / "universal" / "step00000030"


def test_head_shard_paths_of_a_checkpoint_or_a_folder_of_bare_shards(tmp_path):
    folder = _tag(tmp_path, 5)
    bare = tmp_path / "bare"
    bare.mkdir()
    shard = {"weight": torch.zeros(3, 2), "meta": {}}
    for r in range(2):
        save_shard(shard, folder / shard_name(r, 2))
        save_shard(shard, bare / shard_name(r, 2))
    want = [folder / shard_name(r, 2) for r in range(2)]
    assert head_shard_paths(tmp_path) == want == head_shard_paths(folder)
    assert head_shard_paths(bare) == [bare / shard_name(r, 2) for r in range(2)]
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        head_shard_paths(tmp_path / "nowhere")


# ---- restore plans ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "now", "optimizer", "mode"),
    [
        ((2, 2), (2, 2), "sgd", RestoreMode.ENGINE),  # the same run
        ((2, 0), (4, 0), "sgd", RestoreMode.ENGINE),  # stage 0 holds full states
        ((2, 2), (4, 2), "sgd", RestoreMode.WEIGHTS),  # SGD momentum: no universal conversion
        ((2, 0), (2, 2), "adamw", RestoreMode.WEIGHTS),  # the stage changed
    ],
)
def test_restore_plans(tmp_path, saved, now, optimizer, mode):
    ref = CheckpointRef(tmp_path / "step00000004", {"step": 4, "world_size": saved[0],
                                                    "zero_stage": saved[1]})  # fmt: skip
    plan = plan_restore(ref, stage=now[1], world_size=now[0], optimizer=optimizer)
    assert plan.mode is mode
    ds = {"zero_optimization": {"stage": now[1]}}
    assert plan.ds_config(ds) == ds and plan.ds_config(ds) is not ds
    assert plan.load_dir == (tmp_path if mode is RestoreMode.ENGINE else None)
