"""Host and disk banks: bit-identical to the device bank (gathers, rounding, both optimizers,
prefetch), in the trainer at W=2 across a resume, with bounded resident memory on disk."""

from __future__ import annotations

import re

import pytest
import torch

import pfc_ds
from pfc_ds.head.host_bank import DiskBank
from tests.dist import run_distributed
from tests.trainer_helpers import cfg_dict, ds_config, full_head, make_trainer


def _head_run(bank: str, dtype: torch.dtype, opt: str, prefetch: bool, path, accum: int = 1):
    torch.manual_seed(0)
    head = pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.0, 0.3), 16, 500, sample_rate=0.2, dtype=dtype,
        even_batches=True, bank=bank, bank_path=str(path),
    )  # fmt: skip
    sgd = opt == "sgd"
    o = pfc_ds.SparseSGD(head, 0.5, 0.9, 5e-4) if sgd else pfc_ds.SparseAdamW(head, 0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        micro = [
            (torch.randn(12, 16, generator=g, requires_grad=True), torch.randint(0, 500, (12,), generator=g))
            for _ in range(accum)
        ]  # fmt: skip
        if prefetch or accum > 1:
            head.prefetch([labels for _, labels in micro])
        for emb, labels in micro:
            head(emb, labels).backward()
        o.step()
        o.zero_grad()
    return {k: v.clone() for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("bank", ["host", "disk"])
@pytest.mark.parametrize("prefetch,accum", [(False, 1), (True, 1), (True, 2)])
def test_offloaded_banks_equal_the_device_bank(tmp_path, dtype, opt, bank, prefetch, accum):
    ref = _head_run("device", dtype, opt, False, tmp_path / "ref", accum)
    got = _head_run(bank, dtype, opt, prefetch, tmp_path / "bank", accum)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_disk_bank_files_and_released_pages(tmp_path):
    bank = DiskBank(
        tmp_path, seed=3, class_start=100, num_local=40_000, embedding_size=64,
        dtype=torch.float32, device="cpu", rank=1, world_size=2,
    )  # fmt: skip
    assert (tmp_path / "bank_00001_of_00002.weight.bin").stat().st_size == 40_000 * 64 * 4
    eager = pfc_ds.head.bank.init_centres(3, 100, 40_000, 64, torch.float32)
    rows = torch.arange(0, 40_000, 3)
    assert torch.equal(bank.gather(rows), eager[rows])
    bank.ensure_state("momentum")
    bank.apply_update(rows, eager[rows] * 2, torch.ones(len(rows), 64))
    bank.flush()
    assert torch.equal(bank.gather(rows), eager[rows] * 2)
    assert torch.equal(
        bank.gather_state("momentum", torch.tensor([0, 1, 3])),
        torch.tensor([[1.0], [0.0], [1.0]]).expand(3, 64),
    )
    # After each lane job the mapped pages are released: this process holds none of the
    # bank's files resident (the page cache still has them).
    assert _mapped_rss_kb(tmp_path) < 64


def _mapped_rss_kb(folder) -> int:
    """Resident KB of this process's mappings of files in ``folder`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line
                inside = line.rstrip().endswith(".bin") and str(folder) in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def _train_bank(out: str, bank: str, dtype: str, stop: int | None):
    cfg = cfg_dict(
        head={"sample_rate": 0.5, "dtype": dtype, "bank": bank, "bank_path": f"{out}/bank"},
        data={"num_classes": 40},
        train={"max_steps": 20, "save_every": 10, "batch_size": 4},
    )
    trainer = make_trainer(cfg, ds_config(0), out, resume=stop is None)
    trainer.fit(stop_at=stop)
    return full_head(trainer), trainer.backbone_state()


def _train_banks(rank: int, world: int, tmp: str, dtype: str) -> dict:
    """Each bank stops after step 10 (saved), then a fresh trainer resumes it to step 20. One
    launch runs all three: a spawn costs more than the training."""
    results = {}
    for bank in ("device", "host", "disk"):
        out = f"{tmp}/{bank}"
        _train_bank(out, bank, dtype, 10)
        results[bank] = _train_bank(out, bank, dtype, None)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_trainer_banks_bit_identical_across_resume(tmp_path, dtype):
    results = run_distributed(_train_banks, 2, str(tmp_path), dtype)[0]
    (head_ref, bb_ref) = results["device"]
    for bank in ("host", "disk"):
        head, bb = results[bank]
        for k in head_ref:
            assert torch.equal(head_ref[k], head[k]), (bank, k)
        for k in bb_ref:
            assert torch.equal(bb_ref[k], bb[k]), (bank, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_disk_bank_checkpoints_copy_files_and_every_bank_loads_them(tmp_path, monkeypatch, dtype):
    """A disk bank's save copies its files (nothing streams through memory); a load into a
    disk bank copies row ranges file to file, into the others a chunk at a time; all equal."""
    from pfc_ds.checkpoint import shard_files
    from pfc_ds.head import row_files

    run = {}
    head = _trained_head("disk", dtype, tmp_path / "bank", run)
    monkeypatch.setattr(shard_files, "_stream", None)  # would fail if the rows streamed
    state = {**head.state_dict(), **head.bank.file_rows()}
    (tmp_path / "ck").mkdir()
    shard_files.save_shard(state, tmp_path / "ck" / "head_shard_00000_of_00001.pt")
    monkeypatch.undo()
    saved = tmp_path / "ck" / "head_shard_00000_of_00001.pt"
    assert sorted(p.name.split(".")[2] for p in saved.parent.glob("*.bin")) == [
        "exp_avg", "exp_avg_sq", "steps", "weight"
    ]  # fmt: skip
    for name in ("weight", "exp_avg", "steps"):
        copy = saved.with_name(f"{saved.name}.{name}.bin").read_bytes()
        assert copy == head.bank.file_of(name).read_bytes(), name
    want = {k: v.clone() for k, v in run["state"].items()}
    for bank in ("device", "host", "disk"):
        fresh = _new_head(bank, dtype, tmp_path / f"load_{bank}")
        if bank == "disk":  # same dtype: kernel copies only, no buffered read
            monkeypatch.setattr(row_files.FileRows, "read_into", None)
        fresh.load_state_dict(shard_files.file_shard([saved], 1, 0, seed=0))
        monkeypatch.undo()
        if bank == "disk":  # loaded without touching the mapped pages
            assert _mapped_rss_kb(tmp_path / "load_disk") < 64
        got = fresh.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), (bank, k)


def _new_head(bank: str, dtype: torch.dtype, path) -> pfc_ds.PartialFC:
    torch.manual_seed(0)
    return pfc_ds.PartialFC(
        pfc_ds.CombinedMarginLoss(32.0, 1.0, 0.0, 0.3), 16, 500, sample_rate=0.2, dtype=dtype,
        bank=bank, bank_path=str(path),
    )  # fmt: skip


def _trained_head(bank: str, dtype: torch.dtype, path, out: dict) -> pfc_ds.PartialFC:
    head = _new_head(bank, dtype, path)
    o = pfc_ds.SparseAdamW(head, 0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        head(
            torch.randn(12, 16, generator=g, requires_grad=True),
            torch.randint(0, 500, (12,), generator=g),
        ).backward()
        o.step()
        o.zero_grad()
    out["state"] = {k: v for k, v in head.state_dict().items() if isinstance(v, torch.Tensor)}
    return head


def test_pinned_pool_reuses_a_buffer_only_once_its_copy_is_done():
    from pfc_ds.head.host_bank import PinnedPool

    pool, busy = PinnedPool(pin=False), [True]
    a, buf_a = pool.take((4, 8), torch.float16)  # 64 B
    pool.lend(buf_a, lambda: busy[0])
    b, buf_b = pool.take((4, 8), torch.float32)  # buf_a is still being copied from: 128 B
    assert buf_b.data_ptr() != buf_a.data_ptr() and tuple(b.shape) == (4, 8)
    pool.lend(buf_b, lambda: False)
    busy[0] = False
    c, buf_c = pool.take((25,), torch.float32)  # 100 B: only the second free buffer fits
    assert buf_c.data_ptr() == buf_b.data_ptr() and c.dtype == torch.float32
    d, buf_d = pool.take((8,), torch.float32)  # 32 B: the 64 B one, free again
    assert buf_d.data_ptr() == buf_a.data_ptr() and d.shape == (8,) and a.shape == (4, 8)
    pool.lend(buf_c, lambda: False)
    pool.lend(buf_d, lambda: False)
    assert pool.nbytes() == 64 + 128
    empty, _ = pool.take((0, 8), torch.float32)  # a block without rows
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("bank", ["device", "host", "disk"])
def test_bank_flags_any_non_finite_value_written_and_a_load_clears_it(tmp_path, bank):
    """A save reads the flag, not the bank (for a disk bank that would read every page)."""
    head = _new_head(bank, torch.float16, tmp_path)
    assert bool(head.bank.all_finite())
    head.bank.ensure_state("momentum")
    ok = torch.ones(2, 16)
    head.bank.apply_update(torch.tensor([3, 4]), ok, ok)
    assert bool(head.bank.all_finite())
    head.bank.write_state("momentum", torch.tensor([7]), torch.full((1, 16), float("inf")))
    assert not bool(head.bank.all_finite())
    head.load_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in _new_head("device", torch.float16, tmp_path / "x").state_dict().items()})  # fmt: skip
    assert bool(head.bank.all_finite())
