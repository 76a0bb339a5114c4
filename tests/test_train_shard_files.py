"""Head shard files: row tensors stream to raw files in chunks and load memory-mapped."""

from __future__ import annotations

import pytest
import torch

from pfc_ds.checkpoint import shard_files
from pfc_ds.checkpoint.shard_files import atomic_save, load_shard, save_shard


def _state(dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(1000, 24, generator=g).to(dtype),
        "momentum": None,
        "exp_avg": torch.randn(1000, 24, generator=g).to(dtype),
        "steps": torch.randint(0, 9, (1000,), generator=g, dtype=torch.int32),
        "rng": torch.tensor([5, 3]),
        "meta": {"num_classes": 1000, "rank": 0},
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_stream_in_chunks_and_load_back_bit_exact(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(shard_files, "_CHUNK_BYTES", 1000)  # many chunks, a partial last one
    state = _state(dtype)
    path = tmp_path / "head_shard_00000_of_00001.pt"
    save_shard(state, path)
    assert path.stat().st_size < 20_000  # the rows are not in the .pt
    raw = sorted(p.name for p in tmp_path.glob("*.bin"))
    assert raw == [f"{path.name}.{k}.bin" for k in ("exp_avg", "steps", "weight")]
    back = load_shard(path)
    for key in ("weight", "exp_avg", "steps", "rng"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), key
    assert back["momentum"] is None and back["meta"] == state["meta"]
    back["weight"][0] += 1  # a copy-on-write map: the file keeps its rows
    assert torch.equal(load_shard(path)["weight"], state["weight"])


def test_single_file_shards_of_earlier_versions_still_load(tmp_path):
    state = _state(torch.float32)
    path = tmp_path / "head_shard_00000_of_00001.pt"
    atomic_save(state, path)
    assert torch.equal(load_shard(path)["weight"], state["weight"])


def test_a_truncated_row_file_is_named(tmp_path):
    path = tmp_path / "head_shard_00000_of_00001.pt"
    save_shard(_state(torch.float16), path)
    raw = tmp_path / f"{path.name}.weight.bin"
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"weight\.bin: 47990 bytes, expected 48000"):
        load_shard(path)


# ---- rows that stay in files: reshard and load without holding a shard ----------------------


def _saved_shards(folder, num_classes: int, world: int, dtype, states=("momentum", "steps")):
    """A ``world``-rank head saved in the raw-file format; global row r holds the value r."""
    from pfc_ds.checkpoint.shard_files import shard_name
    from pfc_ds.head.sharding import shard_range

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in range(world):
        start, num = shard_range(num_classes, world, rank)
        rows = torch.arange(start, start + num, dtype=torch.float32)[:, None].expand(num, 5)
        state = {
            "weight": rows.to(dtype),
            "momentum": None,
            "rng": torch.tensor([rank, 7]),
            "meta": {"num_classes": num_classes, "world_size": world, "rank": rank,
                     "class_start": start, "num_local": num, "embedding_size": 5},
        }  # fmt: skip
        if "momentum" in states and rank != 1:  # rank 1's rows were never updated
            state["momentum"] = -rows.to(dtype)
        if "steps" in states:
            state["steps"] = torch.arange(start, start + num, dtype=torch.int32)
        paths.append(folder / shard_name(rank, world))
        save_shard(state, paths[-1])
    return paths


@pytest.mark.parametrize(("src", "dst"), [(3, 2), (2, 3), (1, 4), (4, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_shards_equal_the_in_memory_reshard(tmp_path, monkeypatch, src, dst, dtype):
    from pfc_ds.checkpoint.shard_files import file_shard, shard_name
    from pfc_ds.head.reshard import reshard_shard
    from pfc_ds.head.row_files import FileRows

    paths = _saved_shards(tmp_path / "src", 23, src, dtype)
    monkeypatch.setattr(shard_files, "_stream", None)  # a file shard must never stream rows
    for rank in range(dst):
        lazy = file_shard(paths, dst, rank, seed=4)
        want = reshard_shard(
            lambda r: load_shard(paths[r]), num_classes=23, embedding_size=5,
            src_world=src, dst_world=dst, dst_rank=rank, seed=4,
        )  # fmt: skip
        assert isinstance(lazy["weight"], FileRows) and lazy["meta"] == want["meta"]
        assert torch.equal(lazy["rng"], want["rng"])
        out = tmp_path / "dst" / shard_name(rank, dst)
        out.parent.mkdir(exist_ok=True)
        save_shard(lazy, out)  # row ranges copied file to file
        back = load_shard(out)
        for key in ("weight", "momentum", "steps"):
            if want[key] is None:  # no overlapping source has it
                assert back[key] is None and lazy[key] is None, key
                continue
            assert back[key].dtype == want[key].dtype and torch.equal(back[key], want[key]), key
        if lazy["momentum"] is None:
            continue
        # Read into tensors of another dtype, a chunk at a time, like a bank's load.
        monkeypatch.setattr("pfc_ds.head.row_files.CHUNK_BYTES", 24)
        got = torch.full(tuple(lazy["momentum"].shape), 9.0)
        lazy["momentum"].read_into(got)
        covered = torch.zeros(len(got), dtype=torch.bool)
        for _, _, d0, n in lazy["momentum"].pieces:
            covered[d0 : d0 + n] = True
        assert torch.equal(got[covered], want["momentum"][covered].float())
        assert (got[~covered] == 9).all()  # uncovered rows are the loader's zeros to keep


def test_file_shard_refuses_rows_inside_the_pt_naming_the_file(tmp_path):
    from pfc_ds.checkpoint.shard_files import file_shard

    (path,) = _saved_shards(tmp_path, 9, 1, torch.float32)
    atomic_save(load_shard(path), path)  # the rows inside the .pt: not a format we write
    with pytest.raises(ValueError, match=f"{path}: weight rows inside the .pt"):
        file_shard([path], 1, 0, seed=0)


@pytest.mark.parametrize(("src", "dst"), [(3, 2), (1, 3)])
def test_a_disk_bank_loads_row_ranges_file_to_file(tmp_path, monkeypatch, src, dst):
    """Same-dtype rows are kernel copies window by window; fp16 momentum into an fp32 one is
    read and converted a chunk at a time; both equal the in-memory reshard."""
    from pfc_ds.checkpoint.shard_files import file_shard
    from pfc_ds.head import host_bank
    from pfc_ds.head.bank import ROW_STATES
    from pfc_ds.head.reshard import reshard_shard
    from pfc_ds.head.sharding import shard_range

    monkeypatch.setattr(host_bank, "_WINDOW_BYTES", 30)  # windows of 3 weight rows
    paths = _saved_shards(tmp_path / "src", 23, src, torch.float16)
    for rank in range(dst):
        start, num = shard_range(23, dst, rank)
        bank = host_bank.DiskBank(
            tmp_path / "bank", seed=0, class_start=start, num_local=num, embedding_size=5,
            dtype=torch.float16, device="cpu", rank=rank, world_size=dst,
            momentum_dtype=torch.float32,
        )  # fmt: skip
        lazy = file_shard(paths, dst, rank, seed=0)
        bank.load(lazy["weight"], {k: lazy.get(k) for k in ROW_STATES})
        want = reshard_shard(
            lambda r: load_shard(paths[r]), num_classes=23, embedding_size=5,
            src_world=src, dst_world=dst, dst_rank=rank,
        )  # fmt: skip
        assert torch.equal(bank.weight, want["weight"])
        assert torch.equal(bank.states["steps"], want["steps"])
        if want["momentum"] is None:
            assert "momentum" not in bank.states
        else:
            assert torch.equal(bank.states["momentum"], want["momentum"].float())
