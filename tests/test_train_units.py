"""Fast, single-process tests of the trainer's pure pieces: config, schedule, synthetic data,
DeepSpeed-config assembly, metrics, and head resharding (library and CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfc_ds.head.reshard import consolidate, reshard, resharded_rng, shard_meta
from pfc_ds.head.sharding import shard_range
from pfc_ds.train.config import Config, ConfigError, load_config
from pfc_ds.train.engine import build_ds_config
from pfc_ds.train.metrics import MetricsLogger
from pfc_ds.train.schedule import PolynomialLRWarmup
from pfc_ds.train.synthetic import SyntheticFaces, synthetic_samples

ROOT = Path(__file__).resolve().parents[1]

# ---- config -----------------------------------------------------------------------------------

REAL_CONFIGS = {  # name: (backbone, classes, images, sample rate, margin)
    "ms1mv3_r50": ("r50", 93431, 5179510, 1.0, [1.0, 0.5, 0.0]),
    "glint360k_r100": ("r100", 360232, 17091657, 1.0, [1.0, 0.0, 0.4]),
    "wf42m_pfc02_r100": ("r100", 2059906, 42474557, 0.2, [1.0, 0.0, 0.4]),
    "wf42m_adaface_r100": ("r100", 2059906, 42474557, 0.2, "adaface"),
    "wf42m_pfc03_vit_b": ("vit_b_dp005_mask_005", 2059906, 42474557, 0.3, [1.0, 0.0, 0.4]),
    "synthetic_3m_pfc01_r50": ("r50", 3000000, 3000000, 0.1, [1.0, 0.0, 0.4]),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_shipped_configs_load_with_real_counts(name):
    from pfc_ds.backbones import available_backbones

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    backbone, classes, images, rate, margin = REAL_CONFIGS[name]
    assert cfg.model.backbone == backbone and backbone in available_backbones()
    assert (cfg.data.num_classes, cfg.data.num_images) == (classes, images)
    assert cfg.head.sample_rate == rate and cfg.head.margin == margin
    assert (ROOT / cfg.train.deepspeed).is_file()


def test_demo_config_loads():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml")
    assert cfg.data.source == "synthetic" and cfg.model.backbone == "tiny"
    assert cfg.head_optimizer() == ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4})


def test_vit_config_trains_the_head_with_adamw_like_insightface():
    cfg = load_config(ROOT / "configs" / "wf42m_pfc03_vit_b.yaml")
    name, kwargs = cfg.head_optimizer()
    assert name == "adamw" and kwargs == {"lr": 0.001, "betas": (0.9, 0.999), "weight_decay": 0.1}
    with pytest.raises(ConfigError, match=r"head\.momentum applies to an sgd head"):
        load_config(ROOT / "configs" / "wf42m_pfc03_vit_b.yaml", ["head.momentum=0.9"])


def test_all_ds_configs_parse_and_set_clipping():
    names = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))
    for stage in range(4):
        for prec in ("fp16", "bf16", "fp32"):
            assert f"zero{stage}_{prec}" in names
    assert {"zero2_fp16_offload", "cpu", "cpu_bf16"} <= set(names)
    for name in names:
        ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
        assert ds["gradient_clipping"] == 5.0, name  # insightface clips the backbone at 5
        assert "optimizer" not in ds and "scheduler" not in ds, name
        if ds.get("fp16", {}).get("enabled"):
            assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["hysteresis"] == 1, name


def test_set_overrides_and_types():
    cfg = load_config(
        ROOT / "configs" / "demo_cpu.yaml",
        [
            "train.batch_size=32",
            "head.margin=[1.0, 0.5, 0.0]",
            "model.pretrained=null",
            "optim.lr=1e-2",
        ],
    )
    assert cfg.train.batch_size == 32 and cfg.head.margin == [1.0, 0.5, 0.0]
    assert cfg.optim.lr == 0.01


def test_sample_rate_zero_means_positives_only_as_in_the_head():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["head.sample_rate=0"])
    assert cfg.head.sample_rate == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.nmae=sgd", "unknown key 'optim.nmae'; allowed: name, lr, momentum"),
        ("optim.name=adam", "optim.name='adam' is not allowed; allowed: sgd, adamw"),
        ("data.source=lmdb", "data.source='lmdb' is not allowed; allowed: synthetic, rec, folder"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("train.batch_size=abc", "train.batch_size must be int, got 'abc'"),
        ("head.momentum_dtype=fp8", "allowed: null, fp32, fp16, bf16"),
        ("head.sample_rate=1.5", "head.sample_rate must be in [0, 1], got 1.5"),
        ("head.sample_rate=-0.1", "head.sample_rate must be in [0, 1], got -0.1"),
        ("data.rec=/x", "data.rec is not a key of the synthetic source; allowed: source, "),
        ("bogus.x=1", "unknown key 'bogus'; allowed: model, head, data, optim, train"),
        ("train.batch_size", "--set expects key=value"),
        ("head.margin=arcface", "head.margin must be [m1, m2, m3] or adaface, got 'arcface'"),
        ("head.margin=[1.0, 0.5]", "head.margin must be [m1, m2, m3] or adaface, got [1.0, 0.5]"),
        ("head.margin=3", "head.margin must be list or str, got 3"),
        ("head.adaface_m=2.0", "head.adaface_m must be in [0, pi/2), got 2.0"),
        ("head.adaface_h=-1", "head.adaface_h must be >= 0, got -1.0"),
        ("head.adaface_t_alpha=1.5", "head.adaface_t_alpha must be in [0, 1], got 1.5"),
    ],
)
def test_config_errors_name_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo_cpu.yaml", [override])
    assert message in str(err.value)


def test_an_sgd_head_under_adamw_requires_its_own_hyperparameters():
    cfg = {"optim": {"name": "adamw"}, "data": {"num_classes": 10}, "head": {"optimizer": "sgd"}}
    with pytest.raises(ConfigError, match=r"head\.lr, head\.momentum and head\.weight_decay"):
        Config.from_dict(cfg)
    # Without head.optimizer the head follows optim.name: AdamW with optim's settings.
    adamw = Config.from_dict({"optim": {"name": "adamw"}, "data": {"num_classes": 10}})
    assert adamw.head_optimizer()[0] == "adamw"


def test_synthetic_source_requires_num_classes_and_rec_defaults_to_the_data_set():
    with pytest.raises(
        ConfigError, match=r"data\.num_classes is required with data\.source: synthetic"
    ):
        Config.from_dict({})
    assert (
        Config.from_dict({"data": {"source": "rec", "path": "/data/ms1m"}}).data.num_classes is None
    )


def test_rec_source_passes_pipeline_keys_through():
    cfg = Config.from_dict({"data": {"source": "rec", "rec": "/data/ms1m", "num_workers": 4}})
    assert cfg.data.pipeline == {"rec": "/data/ms1m", "num_workers": 4}


def test_build_ds_config_writes_batch_sizes_and_rejects_clashes(tmp_path):
    cfg = Config.from_dict(
        {"train": {"batch_size": 16, "grad_accum": 3}, "data": {"num_classes": 10}}
    )
    ds = build_ds_config(ROOT / "ds_configs" / "zero2_fp16.json", cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 16 * 3 * 4
    assert ds["zero_allow_untested_optimizer"] is True
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 but the YAML gives 16"):
        build_ds_config({"train_micro_batch_size_per_gpu": 8}, cfg, world_size=1)
    with pytest.raises(ConfigError, match="'optimizer' section"):
        build_ds_config({"optimizer": {"type": "Adam"}}, cfg, world_size=1)


# ---- schedule ---------------------------------------------------------------------------------


def _insightface_lr(base: float, warmup: int, total: int, power: float, k: int) -> float:
    """insightface's PolynomialLRWarmup as a closed form of ``last_epoch == k``."""
    if k == 0:
        return base  # its quirk: step 0 at the full LR
    if k <= warmup:
        return base * k / warmup
    return base * (1.0 - (k - warmup) / (total - warmup)) ** power


def test_schedule_matches_insightface_after_warmup_and_ramps_without_zero():
    sched = PolynomialLRWarmup(warmup_steps=10, total_steps=100, power=2.0)
    lrs = [0.1 * sched.factor(k) for k in range(100)]
    for k in range(10, 100):
        assert lrs[k] == pytest.approx(_insightface_lr(0.1, 10, 100, 2.0, k))
    assert lrs[:10] == pytest.approx([0.1 * (k + 1) / 10 for k in range(10)])
    assert min(lrs) > 0 and max(lrs) == pytest.approx(0.1)


def test_schedule_applies_one_factor_to_every_optimizer():
    sched = PolynomialLRWarmup(2, 5)
    backbone, head = [{"lr": 0.0}, {"lr": 0.0}], [{"lr": 0.0}]
    assert sched.apply(3, [(backbone, 0.2), (head, 0.5)]) == pytest.approx(2 / 3)
    assert [g["lr"] for g in backbone] == pytest.approx([0.2 * 2 / 3] * 2)
    assert head[0]["lr"] == pytest.approx(0.5 * 2 / 3)


# ---- synthetic data ---------------------------------------------------------------------------


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_synthetic_is_a_function_of_the_global_index():
    x, y = synthetic_samples(torch.arange(10, 20), num_classes=7, image_size=24, seed=3)
    x2, y2 = synthetic_samples(torch.arange(15, 20), num_classes=7, image_size=24, seed=3)
    assert torch.equal(x[5:], x2) and torch.equal(y[5:], y2)
    assert x.shape == (10, 3, 24, 24) and y.dtype == torch.int64
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    x3, _ = synthetic_samples(torch.arange(10, 20), num_classes=7, image_size=24, seed=4)
    assert not torch.equal(x, x3)


def test_synthetic_ranks_read_the_single_rank_global_batch():
    kw = {"num_classes": 5, "num_images": 48, "image_size": 16, "seed": 1}
    one = SyntheticFaces(batch_size=8, **kw)
    two = [SyntheticFaces(batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(one) == len(two[0]) == 6
    for (x, y), (x0, y0), (x1, y1) in zip(one, two[0], two[1], strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def test_synthetic_state_resumes_mid_epoch_and_across_epochs():
    kw = {"num_classes": 5, "num_images": 40, "image_size": 16, "batch_size": 8}
    a = SyntheticFaces(**kw)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    rest = _epoch(it)
    b = SyntheticFaces(**kw)
    b.load_state_dict(state)
    assert torch.equal(_epoch(b)[0], rest[0])
    a.reset()
    b.reset()
    second = _epoch(a)
    assert torch.equal(_epoch(b)[0], second[0])
    assert not torch.equal(second[0][:8], rest[0][:8])  # the next epoch draws new indices


# ---- metrics ----------------------------------------------------------------------------------


def test_metrics_jsonl_and_progress_line(tmp_path):
    import io

    stream = io.StringIO()
    m = MetricsLogger(tmp_path, rank=0, total_steps=10, stream=stream)
    m.start(0)
    phases = {"data": 0.1, "backbone": 0.2, "head": 0.1, "optimizer": 0.05}
    m.log(5, loss=3.5, lr=0.1, images=640, steps=5, loss_scale=1024.0, phases=phases)
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {"step": 5, "loss": 3.5, "lr": 0.1, "loss_scale": 1024.0}.items() <= rec.items()
    assert rec["img_per_s"] > 0 and rec["time_backbone"] == pytest.approx(0.04)
    line = stream.getvalue()
    assert line.startswith("step 5/10 loss 3.5000 lr 0.10000 img/s") and "scale 1024 eta" in line
    other = MetricsLogger(tmp_path / "r1", rank=1, total_steps=10)
    other.log(5, loss=1.0, lr=0.1, images=1, steps=1, loss_scale=None, phases=phases)
    assert not (tmp_path / "r1").exists()


# ---- resharding -------------------------------------------------------------------------------


def _shards(num_classes: int, world: int, dim: int = 3, momentum: bool = True) -> list[dict]:
    full_w = torch.arange(num_classes * dim, dtype=torch.float32).view(num_classes, dim)
    out = []
    for rank in range(world):
        start, num = shard_range(num_classes, world, rank)
        out.append(
            {
                "weight": full_w[start : start + num].clone(),
                "momentum": -full_w[start : start + num].clone() if momentum else None,
                "rng": torch.Generator().manual_seed(rank).get_state(),
                "meta": {
                    "num_classes": num_classes,
                    "world_size": world,
                    "rank": rank,
                    "class_start": start,
                    "num_local": num,
                    "embedding_size": dim,
                },
            }
        )
    return out


@pytest.mark.parametrize(("src", "dst"), [(2, 1), (1, 2), (3, 2), (2, 5), (4, 4)])
def test_reshard_keeps_every_row_weight_and_momentum(src, dst):
    shards = _shards(11, src)
    new = reshard(shards, dst, seed=9)
    assert shard_meta(new) == (11, 3, dst)
    full = consolidate(shards)
    assert torch.equal(consolidate(new)["weight"], full["weight"])
    assert torch.equal(consolidate(new)["momentum"], full["momentum"])
    assert torch.equal(full["weight"][:, 0], torch.arange(11) * 3.0)
    assert torch.equal(consolidate(reshard(new, src))["weight"], full["weight"])
    if src == dst:
        assert all(torch.equal(a["rng"], b["rng"]) for a, b in zip(new, shards, strict=True))
    else:
        assert torch.equal(new[-1]["rng"], resharded_rng(9, dst, dst - 1))
        assert len({bytes(s["rng"].numpy()) for s in new}) == dst


def test_reshard_momentum_none_and_mismatched_sets():
    new = reshard(_shards(7, 2, momentum=False), 3)
    assert all(s["momentum"] is None for s in new)
    mixed = _shards(7, 2)
    mixed[1]["momentum"] = None  # a shard whose rows were never updated
    full = consolidate(mixed)
    assert torch.equal(full["momentum"][4:], torch.zeros(3, 3))
    with pytest.raises(ValueError, match="got 1 shard"):
        reshard(_shards(7, 2)[:1], 1)
    bad = _shards(7, 2)
    bad[1]["meta"]["class_start"] = 3
    with pytest.raises(ValueError, match="does not fit a 2-rank head"):
        reshard(bad, 1)


def test_reshard_cli_roundtrip(tmp_path):
    from pfc_ds.checkpoint.shard_files import save_shard, shard_name

    src = tmp_path / "src"
    src.mkdir()
    for rank, shard in enumerate(_shards(10, 2)):
        save_shard(shard, src / shard_name(rank, 2))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pfc_ds.tools.reshard", *map(str, a)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    run(src, "--world-size", 3, "--output", tmp_path / "dst")
    assert sorted(p.name for p in (tmp_path / "dst").glob("*.pt")) == [
        shard_name(r, 3) for r in range(3)
    ]
    run(tmp_path / "dst", "--consolidate", "--output", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert torch.equal(full["weight"], consolidate(_shards(10, 2))["weight"])
    assert full["meta"]["world_size"] == 1
    bad = subprocess.run(
        [sys.executable, "-m", "pfc_ds.tools.reshard", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


def test_gpu_switches_follow_the_config():
    """cudnn.benchmark for fixed-size crops and TF32 by default; train.deterministic turns
    deterministic algorithms on and autotuning off (read by the trainer's setup)."""
    from pfc_ds.train import backends
    from pfc_ds.train.config import Config

    data = {"num_classes": 10}
    cfg = Config.from_dict({"train": {"deterministic": True, "tf32": False}, "data": data})
    try:
        backends.configure(tf32=cfg.train.tf32, deterministic=cfg.train.deterministic)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        default = Config.from_dict({"data": data})
        backends.configure(tf32=default.train.tf32, deterministic=default.train.deterministic)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    finally:
        backends.configure(tf32=False, deterministic=False)
        torch.backends.cudnn.benchmark = False
