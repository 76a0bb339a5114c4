"""The centre-conflict finder (``python -m pfc_ds.tools.find_conflicts``).

* The blockwise scan equals a brute-force float64 ``W Wᵀ`` over the whole bank: the same pair
  set above the threshold and cosines within 1e-5, at world sizes 1, 2, 3 (uneven splits), for
  several block sizes, with and without ``--topk``, and for fp16/bf16 shards.
* Two gloo ranks splitting the tiles give the offline result; a trained checkpoint written by 2
  ranks, read at 1, gives back pairs planted as one identity under two labels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from pfc_ds import conflicts
from pfc_ds.checkpoint import head_shard_paths
from pfc_ds.checkpoint.shard_files import save_shard, shard_name
from pfc_ds.conflicts.scan import open_weights, scan
from pfc_ds.head.sharding import shard_range
from pfc_ds.tools import find_conflicts as fc
from tests.dist import run_distributed


def _bank(num: int, dim: int, planted: int, seed: int = 0) -> torch.Tensor:
    """Random centres with ``planted`` near-copies (cos ~0.9-0.99) so pairs exist at high
    thresholds, and a spread of cosines below."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num, dim, generator=g)
    src = torch.randperm(num, generator=g)[: 2 * planted].view(2, planted)
    noise = torch.rand(planted, 1, generator=g) * 0.5
    w[src[1]] = w[src[0]] + noise * torch.randn(planted, dim, generator=g)
    return w


def _write(folder: Path, w: torch.Tensor, world: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in range(world):
        start, num = shard_range(len(w), world, rank)
        meta = {
            "num_classes": len(w),
            "embedding_size": w.shape[1],
            "world_size": world,
            "rank": rank,
            "class_start": start,
            "num_local": num,
        }
        path = folder / shard_name(rank, world)
        save_shard({"weight": w[start : start + num].clone(), "meta": meta}, path)
        paths.append(path)
    return paths


def reference(
    w: torch.Tensor, threshold: float, topk: int | None = None
) -> dict[tuple[int, int], float]:
    """All pairs a < b above ``threshold`` from the full float64 W Wᵀ (``topk``: kept when in
    either class's top K)."""
    n = torch.nn.functional.normalize(w.double(), dim=1)
    s = n @ n.T
    a, b = torch.triu_indices(len(w), len(w), 1)
    c = s[a, b]
    m = c > threshold
    pairs = {(x, y): v for x, y, v in zip(a[m].tolist(), b[m].tolist(), c[m].tolist(), strict=True)}
    if topk is None:
        return pairs
    best: dict[int, list[tuple[float, tuple[int, int]]]] = {}
    for p, v in pairs.items():
        for end in p:
            best.setdefault(end, []).append((v, p))
    keep = {p for lst in best.values() for _, p in sorted(lst, reverse=True)[:topk]}
    return {p: pairs[p] for p in keep}


def _check(got: list[tuple[int, int, float]], want: dict, tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for a, b, c in got:
        assert a < b and (a, b) in want, (a, b, c)
        assert abs(c - want[(a, b)]) <= tol, (a, b, c, want[(a, b)])
    cos = [c for _, _, c in got]
    assert cos == sorted(cos, reverse=True)


def _no_borderline(w: torch.Tensor, threshold: float, margin: float = 1e-4) -> None:
    """No reference cosine lies within ``margin`` of the threshold (fp32 may round across)."""
    n = torch.nn.functional.normalize(w.double(), dim=1)
    s = n @ n.T
    assert not ((s - threshold).abs() < margin).any()


@pytest.mark.parametrize(
    ("world", "block_rows", "topk"),
    [(1, 64, None), (2, 37, None), (3, 50, None), (3, 1000, None), (2, 29, 1), (3, 64, 2)],
)
def test_matches_brute_force(tmp_path, world, block_rows, topk):
    w = _bank(301, 24, planted=40)
    thr = 0.55
    _no_borderline(w, thr)
    paths = _write(tmp_path, w, world)
    got = conflicts.find_conflicts(paths, thr, topk=topk, block_rows=block_rows, device="cpu")
    want = reference(w, thr, topk)
    assert len(want) >= 40 if topk is None else len(want) >= 30
    _check(got, want)


def test_uneven_shards_and_low_threshold():
    """Shards of any sizes (not only insightface's split) and a threshold with many pairs."""
    w = _bank(150, 8, planted=5, seed=2)
    bank = open_weights([w[:7], w[7:100], w[100:101], w[101:]])
    thr = 0.3
    _no_borderline(w, thr)
    got = scan(bank, thr, block_rows=16, device="cpu").pairs()
    want = reference(w, thr)
    assert len(want) > 1000
    _check(got, want)


def test_max_pairs_keeps_highest_and_warns(tmp_path, capsys):
    w = _bank(200, 8, planted=5, seed=2)
    # Same shard split for both, so the blocks (and their float rounding) are the same.
    full = scan(open_weights([w[:90], w[90:]]), 0.2, block_rows=32, device="cpu")
    capped = scan(open_weights([w[:90], w[90:]]), 0.2, block_rows=32, max_pairs=50, device="cpu")
    assert not full.truncated and capped.truncated and len(full.a) > 1000
    assert capped.pairs() == full.pairs()[:50]
    paths = _write(tmp_path / "s", w, 2)
    assert fc.main([str(paths[0].parent), "--threshold", "0.2", "--max-pairs", "50"]) == 0
    assert "more than --max-pairs 50" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_shards(tmp_path, dtype):
    """Half shards are scanned in fp32: exactly the brute force of the stored (rounded) rows."""
    w = _bank(257, 32, planted=30, seed=3).to(dtype)
    thr = 0.6
    _no_borderline(w.float(), thr)
    paths = _write(tmp_path, w, 2)
    bank = conflicts.open_bank(paths)
    assert bank.weights[0].dtype == dtype
    _check(conflicts.find_conflicts(paths, thr, block_rows=40), reference(w.float(), thr))


def test_cli_csv_truth_and_checkpoint_layout(tmp_path, capsys):
    """An output folder resolves through ``checkpoints/latest``; CSV and precision/recall."""
    w = _bank(120, 16, planted=10, seed=4)
    out = tmp_path / "run"
    tag = out / "checkpoints" / "step00000010"
    _write(tag, w, 3)
    (tag / "meta.json").write_text("{}")
    (out / "checkpoints" / "latest").write_text("step00000010\n")
    want = reference(w, 0.7)
    truth = tmp_path / "planted.csv"
    planted = [*sorted(want)[:6], (0, 1), (2, 3)]  # 6 true, 2 that are not above 0.7
    truth.write_text("id,label_b,label_a\n" + "".join(f"9,{b},{a}\n" for a, b in planted))
    csv_path = tmp_path / "pairs.csv"
    args = [str(out), "--threshold", "0.7", "--output", str(csv_path), "--truth", str(truth)]
    assert fc.main([*args, "--block-rows", "17"]) == 0
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["class_a", "class_b", "cosine"]
    assert {(int(a), int(b)) for a, b, _ in rows[1:]} == set(want)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["found"] == len(want) and report["planted"] == 8 and report["hits"] == 6
    assert report["precision"] == round(6 / len(want), 4) and report["recall"] == 0.75


def test_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert fc.main([str(missing), "--threshold", "0.7"]) == 2
    assert str(missing) in capsys.readouterr().err
    paths = _write(tmp_path / "tag", _bank(20, 4, planted=2), 2)
    (tmp_path / "tag" / "trainer_state_00000.pt").write_bytes(b"")
    assert fc.main([str(tmp_path / "tag"), "--threshold", "0.7"]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    (tmp_path / "tag" / "trainer_state_00000.pt").unlink()
    paths[1].unlink()
    assert fc.main([str(tmp_path / "tag"), "--threshold", "0.7"]) == 2
    assert "rank(s) [1] of 2 are missing" in capsys.readouterr().err
    _write(tmp_path / "short", _bank(20, 4, planted=2), 1)
    raw = tmp_path / "short" / (shard_name(0, 1) + ".weight.bin")
    raw.write_bytes(raw.read_bytes()[:-4])
    assert fc.main([str(tmp_path / "short"), "--threshold", "0.7"]) == 2
    assert str(raw) in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert fc.main([str(tmp_path / "run"), "--threshold", "0.7"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    for bad in ("1.0", "-1", "nan"):
        with pytest.raises(SystemExit):
            fc.main([str(tmp_path / "short"), "--threshold", bad])
    with pytest.raises(ValueError, match="threshold"):
        scan(open_weights([torch.randn(4, 2)]), 1.5)


def _dist_scan(rank: int, world: int, folder: str, topk: int | None) -> list:
    paths = head_shard_paths(folder)
    res = conflicts.find(paths, 0.55, topk, 23, device="cpu")  # picks up the gloo group
    assert res.stats["world"] == world and res.stats["tiles"] < res.stats["tiles_total"]
    return res.pairs()


def _dist_cli(rank: int, world: int, folder: str, out: str) -> int:
    """The CLI as under torchrun (WORLD_SIZE set, a group up): rank 0 alone writes the CSV."""
    return fc.main([folder, "--threshold", "0.55", "--block-rows", "23", "--output", out])


@pytest.mark.slow
def test_distributed_equals_offline(tmp_path):
    w = _bank(211, 16, planted=25, seed=5)
    _write(tmp_path, w, 3)
    paths = head_shard_paths(tmp_path)
    for topk in (None, 1):
        offline = conflicts.find_conflicts(paths, 0.55, topk=topk, block_rows=23)
        got = run_distributed(_dist_scan, 2, str(tmp_path), topk)
        assert got[0] == got[1] == offline
        assert len(offline) >= 25
    assert run_distributed(_dist_cli, 2, str(tmp_path), str(tmp_path / "d.csv")) == [0, 0]
    assert fc.main([str(tmp_path), "--threshold", "0.55", "--output", str(tmp_path / "o.csv")]) == 0
    assert (tmp_path / "d.csv").read_text() == (tmp_path / "o.csv").read_text()


PLANTED = [(3 * k + 1, 3 * k + 2) for k in range(6)]  # label 3k+2 shows the images of 3k+1


def _train_with_duplicates(rank: int, world: int, out: str) -> float:
    """The real trainer (2 gloo ranks, tiny backbone, CosFace) on the synthetic source, with
    each planted label rendered from its partner's prototype: one identity, two labels."""
    import pfc_ds.train.synthetic as syn
    from tests.trainer_helpers import cfg_dict, ds_config, make_trainer

    num_classes = 40
    alias = torch.arange(num_classes)
    for a, b in PLANTED:
        alias[b] = a
    render = syn.render
    # Distinct classes (an 8x8 prototype grid, little noise): a clean task, so only the
    # planted pairs share a centre direction.
    syn._PROTO_WEIGHT, syn._PROTO_GRID = 0.85, 8
    syn.render = lambda labels, indices, **kw: render(alias[labels], indices, **kw)
    cfg = cfg_dict(
        model={"backbone": "tiny", "embedding_size": 64, "options": {"width": 8}},
        head={
            "margin": [1.0, 0.0, 0.2],
            "scale": 16.0,
            "sample_rate": 1.0,
            "optimizer": "sgd",
            "lr": 0.5,
            "momentum": 0.9,
            "weight_decay": 5e-3,
        },
        data={"num_classes": num_classes, "num_images": 100_000, "image_size": 32},
        optim={"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "warmup_epochs": 0.0},
        train={"batch_size": 32, "max_steps": 300, "save_every": 300, "log_every": 50},
    )
    trainer = make_trainer(cfg, ds_config(0), out)
    trainer.fit()
    return trainer.history[-1]["loss"]


@pytest.mark.slow
def test_recovers_planted_duplicates_from_trained_checkpoint(tmp_path):
    """Written by 2 ranks, read by 1 process (and again after a reshard to 1 shard)."""
    from pfc_ds.checkpoint.shard_files import load_shard
    from pfc_ds.head.reshard import consolidate

    out = tmp_path / "run"
    losses = run_distributed(_train_with_duplicates, 2, str(out))
    assert losses[0] < 2.0
    paths = head_shard_paths(out)
    assert [p.name for p in paths] == [shard_name(r, 2) for r in range(2)]
    found = conflicts.find_conflicts(paths, 0.7)
    prec, rec, _ = conflicts.precision_recall([(a, b) for a, b, _ in found], set(PLANTED))
    assert rec == 1.0 and prec >= 0.75, found
    top = {(a, b) for a, b, _ in found[: len(PLANTED)]}
    assert top == set(PLANTED)  # the planted pairs are the most similar centres

    one = consolidate([load_shard(p) for p in paths])
    (tmp_path / "w1").mkdir()
    save_shard(one, tmp_path / "w1" / shard_name(0, 1))
    assert conflicts.find_conflicts(head_shard_paths(tmp_path / "w1"), 0.7) == found
