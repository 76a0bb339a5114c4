"""The twin analysis of the robustness runs: on a head whose planted twins are the same centre,
every twin is found and is its partner's nearest centre."""

from __future__ import annotations

import json

import torch

from pfc_ds.checkpoint.shard_files import save_shard, shard_name
from pfc_ds.experiments.twins import collect, table
from pfc_ds.head.sharding import shard_range


def test_twins_of_a_planted_head(tmp_path):
    classes, dim = 60, 16
    w = torch.nn.functional.normalize(
        torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1
    )
    planted = [(3, 50), (7, 41), (20, 59)]
    for a, b in planted:
        w[b] = w[a]
    run = tmp_path / "runs" / "conflict-0.3" / "r0.1" / "seed0"
    tag = run / "train"
    tag.mkdir(parents=True)
    for rank in range(2):
        start, num = shard_range(classes, 2, rank)
        meta = {"num_classes": classes, "world_size": 2, "rank": rank, "class_start": start,
                "num_local": num, "embedding_size": dim}  # fmt: skip
        state = {"weight": w[start : start + num].half(), "momentum": None,
                 "rng": torch.tensor([0, 0]), "meta": meta}  # fmt: skip
        save_shard(state, tag / shard_name(rank, 2))
    (run / "result.json").write_text(json.dumps({"noise": "conflict:0.3", "rate": 0.1, "seed": 0,
                                                 "output": str(tag)}))  # fmt: skip
    data = tmp_path / "data" / "conflict-0.3"
    data.mkdir(parents=True)
    (data / "train_conflicts.csv").write_text(
        "label_a,label_b\n" + "".join(f"{a},{b}\n" for a, b in planted)
    )
    (rec,) = collect(tmp_path, [0.999])
    assert abs(rec["twin_cos"] - 1) < 1e-3 and rec["twin_nearest"] == 1.0
    assert rec["twin_cos_below_0"] == 0.0 and abs(rec["random_cos"]) < 0.5
    assert rec["recall@0.999"] == 1.0 and rec["precision@0.999"] == 1.0
    assert "| conflict:0.3 | 0.1 | 1 | 1.000 ± 0.000 |" in table([rec], [0.999])
