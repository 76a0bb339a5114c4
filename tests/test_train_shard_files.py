"""Head shard files: row tensors stream to raw files in chunks and load memory-mapped."""

from __future__ import annotations

import pytest
import torch

from pfc_ds.train import shard_files
from pfc_ds.train.shard_files import atomic_save, load_shard, save_shard


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
