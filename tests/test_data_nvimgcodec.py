"""``data.decoder: nvimgcodec`` on the CPU: the DALI external loader's samples, pixels and state.

The comparisons with DALI skip where DALI is not installed (the borrowed GPU machine); everything
else runs without it, which ``test_builds_and_decodes_without_dali`` checks in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines import DataConfig, DataError, build_loader, codec_loader, imgcodec
from data_pipelines.jpeg import encode_jpeg
from data_pipelines.recordio import RecordWriter, pack_payload, read_index
from data_pipelines.torch_augment import (
    centre_crop,
    colour,
    gaussian_blur,
    hsv_matrix,
    resample_weights,
    resize,
)
from tests.test_data_helpers import decode_ids, make_folder, make_im2rec, make_insightface
from tests.test_data_sizes import MIXED, make_sized_folder

LEVEL = 1 / 127.5  # one uint8 level after normalisation
ALL_AUG = {"downscale": 1.0, "blur": 1.0, "hsv": 1.0, "gray": 1.0}


def _cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("decoder", "nvimgcodec")
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), num_threads=1, **kw)


def _batches(cfg: DataConfig, **kw) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    loader = build_loader(cfg, **{"rank": 0, "world_size": 1, "device": "cpu", **kw})
    out = [(x.clone(), y.clone(), loader.valid) for x, y in loader]
    getattr(loader, "close", lambda: None)()
    return out


def make_textured(prefix: Path, n: int, per_id: int) -> np.ndarray:
    """im2rec layout of smooth random colour fields: resize, blur and hsv all change them."""
    g = torch.Generator().manual_seed(0)
    labels = np.arange(n) // per_id
    with RecordWriter(str(prefix)) as w:
        for i in range(n):
            field = torch.rand(1, 3, 12, 12, generator=g) * 255
            field = F.interpolate(field, size=(112, 112), mode="bilinear")
            rgb = field.clamp(0, 255).round().byte()[0].permute(1, 2, 0).numpy()
            w.write(i, pack_payload(float(labels[i]), encode_jpeg(rgb)))
    return labels


# -- the same stream as DALI's external loader -------------------------------------------------
@pytest.mark.parametrize("source", ["rec", "folder"])
def test_same_images_labels_and_order_as_the_dali_external_loader(
    tmp_path: Path, source: str
) -> None:
    pytest.importorskip("nvidia.dali")
    maker = make_insightface if source == "rec" else make_folder
    truth = maker(tmp_path / "train", 45, per_id=3)
    kw = {"batch_size": 4, "rank": 1, "world_size": 2, "seed": 7}
    runs = {
        decoder: _batches(
            _cfg(tmp_path / "train", tmp_path, source=source, decoder=decoder, last_batch="pad"),
            **kw,
        )
        for decoder in ("dali", "nvimgcodec")
    }
    assert len(runs["dali"]) == len(runs["nvimgcodec"]) == 6
    for (xd, yd, vd), (xn, yn, vn) in zip(runs["dali"], runs["nvimgcodec"], strict=True):
        assert xn.shape == (4, 3, 112, 112) and xn.dtype == torch.float32
        assert yn.dtype == torch.int64 and torch.equal(yd, yn) and vd == vn
        assert float((xd - xn).abs().max()) <= 2 * LEVEL + 1e-6
        assert (decode_ids(xn) == decode_ids(xd)).all()
        assert (yn.numpy() == truth[decode_ids(xn)]).all()


@pytest.mark.parametrize(
    "kw",
    [
        {"dali_aug": ALL_AUG, "mirror": 0.5},
        {"image_size": 56, "dali_aug": True},
        {"image_size": 80, "dali_aug": {"downscale": 1.0, "blur": 0.5, "hsv": 0.5, "gray": 0.5}},
    ],
)
def test_augmented_textured_images_match_dali_to_rounding(tmp_path: Path, kw: dict) -> None:
    """Each uint8 step may round one level differently from DALI's kernels (float32 sums in
    another order), so the bound is 2 levels and few pixels differ at all."""
    pytest.importorskip("nvidia.dali")
    make_textured(tmp_path / "tex", 32, per_id=4)
    runs = {
        decoder: _batches(_cfg(tmp_path / "tex", tmp_path, decoder=decoder, **kw), batch_size=16)
        for decoder in ("dali", "nvimgcodec")
    }
    for (xd, yd, _), (xn, yn, _) in zip(runs["dali"], runs["nvimgcodec"], strict=True):
        size = kw.get("image_size", 112)
        assert xn.shape == xd.shape == (16, 3, size, size) and torch.equal(yd, yn)
        diff = (xd - xn).abs() / LEVEL
        assert float(diff.max()) <= 2 + 1e-4
        assert float((diff > 0.5).float().mean()) < 0.01
        assert float((xn - xn.flip(-1)).abs().max()) > 10 * LEVEL  # textured: flips are visible


# -- the torch ops against independent references ----------------------------------------------
def test_resample_weights_against_torch_and_known_taps() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0, 255, (1, 3, 40, 40)))
    for out in (17, 24, 63):  # away from the border DALI's filter is torch's antialiased one
        w = torch.from_numpy(resample_weights(40, out, 0.0, 40.0))
        ours = w @ x @ w.T
        ref = F.interpolate(x, size=(out, out), mode="bilinear", antialias=True)
        edge = 3 if out < 40 else 1
        inner = (slice(None), slice(None), slice(edge, -edge), slice(edge, -edge))
        assert torch.allclose(ours[inner], ref[inner], atol=1e-9)
    up = torch.from_numpy(resample_weights(40, 63, 0.0, 40.0))  # upscaling: edges clamp alike
    ref = F.interpolate(x, size=(63, 63), mode="bilinear", align_corners=False)
    assert torch.allclose(up @ x @ up.T, ref, atol=1e-9)
    half = resample_weights(112, 56, 0.0, 112.0)  # taps measured from DALI 2.4 on a delta
    np.testing.assert_allclose(half[0, :3], [0.5, 0.375, 0.125])  # tap -1 folds onto pixel 0
    np.testing.assert_allclose(half[1, 1:5], [0.125, 0.375, 0.375, 0.125])
    np.testing.assert_allclose(half.sum(axis=1), 1.0)


def test_fractional_resize_keeps_the_scale_about_the_roi_centre() -> None:
    """Upscaling (plain linear interpolation, which reproduces a ramp) a ramp to a fractional
    size samples it at the centres of the ROI that DALI shrinks about the image centre."""
    side, h = np.float32(1.3419) * np.float32(112), 112
    small = int(np.floor(side + 0.5))
    adjust = small / side
    lo, hi = h / 2 - h / 2 * adjust, h / 2 + h / 2 * adjust
    w = resample_weights(h, small, lo, hi)
    centres = lo + (hi - lo) / small * (np.arange(small) + 0.5) - 0.5
    inner = slice(3, -3)
    np.testing.assert_allclose((w @ np.arange(h, dtype=float))[inner], centres[inner], atol=1e-9)
    assert (hi - lo) / small == pytest.approx(h / side)


def test_blur_and_hsv_against_float64_loops() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1, 3, 9, 11)).astype(np.float64)
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * 0.8**2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    pad = np.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")  # reflect-101
    ref = np.zeros_like(img)
    for c in range(3):
        for i in range(9):
            for j in range(11):
                ref[0, c, i, j] = (pad[0, c, i : i + 3, j : j + 3] * k).sum()
    ours = gaussian_blur(torch.from_numpy(img)).numpy()
    assert np.abs(ours - np.clip(np.round(ref), 0, 255)).max() <= 1  # ties may round apart
    assert np.abs(ours - ref).max() <= 0.5 + 1e-6

    rgb2yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
    for hue, sat in ((0.0, 1.0), (12.5, 1.1), (0.0, 0.0)):
        ours = colour(torch.from_numpy(img), hsv_matrix(hue, sat)[None]).numpy()
        yiq = np.einsum("ij,jhw->ihw", rgb2yiq, img[0])
        h = np.deg2rad(hue)
        i, q = yiq[1].copy(), yiq[2].copy()
        yiq[1] = sat * (np.cos(h) * i + np.sin(h) * q)
        yiq[2] = sat * (-np.sin(h) * i + np.cos(h) * q)
        ref = np.clip(np.einsum("ij,jhw->ihw", np.linalg.inv(rgb2yiq), yiq), 0, 255)
        assert np.abs(ours[0] - ref).max() <= 0.5 + 1e-6
    assert np.array_equal(colour(torch.from_numpy(img), np.eye(3)[None]).numpy(), img)


def test_centre_crop_anchor_is_dalis() -> None:
    """DALI 2.4's anchors for a 112 crop, measured: (in - 112) / 2 rounded half up."""
    for side, anchor in ((150, 19), (113, 1), (115, 2), (117, 3), (119, 4), (112, 0)):
        x = torch.arange(side, dtype=torch.float32).view(1, 1, side, 1).expand(1, 1, side, side)
        out = centre_crop(x, 112)
        assert out.shape[-2:] == (112, 112) and out[0, 0, 0, 0] == anchor


def test_resize_of_a_constant_image_is_constant() -> None:
    x = torch.full((2, 3, 64, 80), 77.0)
    assert torch.equal(resize(x, 112), torch.full((2, 3, 112, 112), 77.0))


# -- sharding, resume, threads ----------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 4])
def test_shards_are_disjoint_complete_and_equal_length(tmp_path: Path, world_size: int) -> None:
    truth = make_insightface(tmp_path / "train", 50, per_id=5, shuffle=True)
    for last_batch in ("pad", "drop"):
        cfg = _cfg(tmp_path / "train", tmp_path, last_batch=last_batch)
        per_rank = []
        for rank in range(world_size):
            batches = _batches(cfg, batch_size=4, rank=rank, world_size=world_size)
            per_rank.append(batches)
            for x, y, _ in batches:
                assert (y.numpy() == truth[decode_ids(x)]).all()
        assert len({len(b) for b in per_rank}) == 1
        new = [np.concatenate([decode_ids(x)[:v] for x, _, v in b]) for b in per_rank]
        seen = np.concatenate(new)
        assert len(set(seen.tolist())) == seen.size  # disjoint
        if last_batch == "pad":
            assert sorted(seen.tolist()) == list(range(50))  # complete
        else:
            assert seen.size == len(per_rank[0]) * 4 * world_size == 48


def test_resume_mid_epoch_gives_the_same_remaining_batches(tmp_path: Path) -> None:
    make_textured(tmp_path / "tex", 64, per_id=4)
    cfg = _cfg(tmp_path / "tex", tmp_path, dali_aug=ALL_AUG | {"gray": 0.3}, mirror=0.5)
    first = build_loader(cfg, batch_size=4, rank=1, world_size=2, device="cpu", seed=11)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["position"], state["reader"]) == (0, 24, "external")
    want = [(x.clone(), y.clone()) for x, y in it]
    first.close()
    second = build_loader(cfg, batch_size=4, rank=1, world_size=2, device="cpu", seed=11)
    second.load_state_dict(json.loads(json.dumps(state)))
    got = [(x.clone(), y.clone()) for x, y in second]
    assert len(got) == len(want) == len(first) - 3 and second.epoch == 0
    for (wx, wy), (gx, gy) in zip(want, got, strict=True):
        assert torch.equal(wy, gy) and torch.equal(wx, gx)  # augmentations replay exactly
    second.close()


def test_a_dali_loaders_state_resumes_at_the_same_sample(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    make_insightface(tmp_path / "train", 40, per_id=4, shuffle=True)
    dali = build_loader(
        _cfg(tmp_path / "train", tmp_path, decoder="dali"),
        batch_size=4,
        rank=0,
        world_size=2,
        device="cpu",
    )
    it = iter(dali)
    next(it)
    state = dali.state_dict()
    after = decode_ids(next(it)[0])
    codec = build_loader(
        _cfg(tmp_path / "train", tmp_path), batch_size=4, rank=0, world_size=2, device="cpu"
    )
    codec.load_state_dict(state)
    assert decode_ids(next(iter(codec))[0]).tolist() == after.tolist()
    codec.close()


def test_decodes_off_the_training_thread_with_one_stream_across_epochs(
    tmp_path: Path, monkeypatch
) -> None:
    make_insightface(tmp_path / "train", 40, per_id=4, shuffle=True)
    cfg = _cfg(tmp_path / "train", tmp_path, last_batch="pad")
    threads: set[str] = set()
    decode = imgcodec.JpegDecoder.decode

    def spy(self, jpegs, stream=None):
        threads.add(threading.current_thread().name)
        return decode(self, jpegs, stream)

    feeders = []
    from data_pipelines import stream_loader

    feeder = stream_loader.Feeder
    monkeypatch.setattr(imgcodec.JpegDecoder, "decode", spy)
    monkeypatch.setattr(
        stream_loader, "Feeder", lambda *a, **k: feeders.append(1) or feeder(*a, **k)
    )
    loader = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu")
    epochs = [[decode_ids(x).tolist() for x, _ in loader] for _ in range(3)]
    assert len(feeders) == 1 and threads == {"pfc-feeder"}
    assert epochs[1] != epochs[0] and sorted(x for batch in epochs[1] for x in batch) == list(
        range(40)
    )
    it = iter(loader)
    next(it)
    loader.reset()  # a jump: the stream restarts at the next epoch
    fifth = [decode_ids(x).tolist() for x, _ in loader]
    assert len(feeders) == 2 and fifth == epochs_of(cfg, 4)
    loader.close()


def epochs_of(cfg: DataConfig, epoch: int) -> list[list[int]]:
    loader = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu")
    loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "position": 0})
    out = [decode_ids(x).tolist() for x, _ in loader]
    loader.close()
    return out


# -- bad input ---------------------------------------------------------------------------------
def test_corrupt_record_is_refused_naming_it_or_skipped(tmp_path: Path) -> None:
    prefix = tmp_path / "train"
    make_im2rec(prefix, 30, per_id=3)
    keys, offsets = read_index(f"{prefix}.idx")
    off = int(offsets[keys.tolist().index(11)])
    with open(f"{prefix}.rec", "r+b") as f:
        f.seek(off + 1)
        f.write(b"\x99")
    with pytest.raises(DataError, match=rf"1 bad record\(s\):\n  bad_magic: key=11 offset={off}"):
        build_loader(_cfg(prefix, tmp_path), batch_size=4, rank=0, world_size=1, device="cpu")
    cfg = _cfg(prefix, tmp_path, skip_corrupt=True, last_batch="pad", shuffle=False)
    batches = _batches(cfg, batch_size=4)
    seen = np.concatenate([decode_ids(x)[:v] for x, _, v in batches])
    assert sorted(seen.tolist()) == sorted(set(range(30)) - {11})


def test_undecodable_jpeg_is_named_when_the_loader_reaches_it(tmp_path: Path) -> None:
    make_im2rec(tmp_path / "train", 8, per_id=2)
    _, offsets = read_index(tmp_path / "train.idx")
    with open(tmp_path / "train.rec", "r+b") as f:
        f.seek(int(offsets[6]) + 8 + 24)
        f.write(b"\0" * 32)
    loader = build_loader(
        _cfg(tmp_path / "train", tmp_path), batch_size=8, rank=0, world_size=1, device="cpu"
    )
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(err.value) == (
        f"{tmp_path / 'train.rec'}: undecodable image(s) at epoch 0 step 0:\n"
        f"  record key=6 offset={int(offsets[6])}: not an image Pillow can identify\n"
        f"Find all with `python -m data_pipelines.check {tmp_path / 'train.rec'} --full`."
    )
    loader.close()


def test_mismatched_sizes_name_the_file_and_resize_loads_them(tmp_path: Path) -> None:
    make_sized_folder(tmp_path / "faces", MIXED)
    cfg = _cfg(tmp_path / "faces", tmp_path, source="folder", shuffle=False)
    with pytest.raises(DataError) as err:
        _batches(cfg, batch_size=4)
    example = f"file {tmp_path / 'faces' / 'id_002' / 'img_0005.jpg'} is 64x80"
    assert str(err.value) == (  # the DALI external loader's message, word for word
        f"{tmp_path / 'faces'}: images of mismatched sizes at epoch 0 step 1 ({example}, "
        "expected 112x112); set data.resize: true to resize them"
    )
    cfg = _cfg(tmp_path / "faces", tmp_path, source="folder", resize=True, shuffle=False)
    batches = _batches(cfg, batch_size=4)
    assert len(batches) == 3 and all(x.shape == (4, 3, 112, 112) for x, _, _ in batches)
    ids = np.concatenate([decode_ids(x) for x, _, _ in batches])
    assert ids.tolist() == list(range(12))  # the 64x80 and 150x150 images resized, not lost


def test_missing_package_is_one_line_naming_the_wheel(tmp_path: Path, monkeypatch) -> None:
    make_im2rec(tmp_path / "train", 8, per_id=2)
    monkeypatch.setattr(imgcodec, "_loaded", {})
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import now fails
    with pytest.raises(DataError) as err:
        build_loader(
            _cfg(tmp_path / "train", tmp_path), batch_size=4, rank=0, world_size=1, device="cpu"
        )
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.decoder: nvimgcodec needs NVIDIA")
    assert message.endswith("install it with `pip install nvidia-nvimgcodec-cu12`")


def test_import_noise_filter_keeps_all_but_the_unused_codecs(capfd) -> None:
    lines = [
        "Failed to load nvtiff library! Please install nvTIFF (see ...).\n",
        "Note: ... it is enough to install the nvJPEG2000 wheel: e.g. `pip install x`\n",
        "[ERROR] [nvjpeg2k_ext] Failed to load nvJPEG2000 library or retrieve version.\n",
        "[ERROR] [nvjpeg-ext] Failed to load nvJPEG library or retrieve version.\n",
        "something else\n",
    ]
    for gpu, kept in ((True, lines[3:]), (False, lines[4:])):
        with imgcodec.filtered_stderr(lambda s, gpu=gpu: imgcodec.unused_codec(s, gpu)) as got:
            os.write(2, "".join(lines).encode())
        assert got == lines and capfd.readouterr().err == "".join(kept)


def test_config_names_the_decoder_key() -> None:
    with pytest.raises(
        ValueError, match=r"data\.decoder: 'pillow' is not one of 'dali', 'nvimgcodec'"
    ):
        DataConfig(path="x", decoder="pillow")
    with pytest.raises(
        ValueError, match=r"data\.decoder 'nvimgcodec' needs data\.reader 'external'"
    ):
        DataConfig(path="x", decoder="nvimgcodec", reader="native")
    assert DataConfig.from_dict({"path": "x", "decoder": "nvimgcodec"}).decoder == "nvimgcodec"
    assert DataConfig(path="x").decoder == "dali"


def test_builds_and_decodes_without_dali(tmp_path: Path) -> None:
    """The borrowed GPU machine has no DALI: nothing on this path may import it (augmented
    and plain; the ids are read from the plain batch)."""
    truth = make_insightface(tmp_path / "train", 16, per_id=4)
    code = f"""
import json, sys
sys.modules["nvidia.dali"] = None  # any import of DALI now raises
from data_pipelines import DataConfig, build_loader
from tests.test_data_helpers import decode_ids
for aug in (True, False):
    cfg = DataConfig(path={str(tmp_path / "train")!r}, decoder="nvimgcodec", cache_dir=None,
                     num_threads=1, dali_aug=aug)
    loader = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu")
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 112, 112), images.shape
print(json.dumps([decode_ids(images).tolist(), labels.tolist()]))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    ids, labels = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(set(ids)) == 8 and labels == truth[ids].tolist()
    assert "nvtiff" not in out.stderr.lower() and "nvjpeg2k" not in out.stderr.lower()


# -- on a GPU (tools/gpu_check.sh) ---------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_decode_matches_the_cpu_decode(tmp_path: Path) -> None:
    """On the device: fp16 device tensors, the same samples and labels as the CPU decode, pixels
    within nvJPEG's and libjpeg-turbo's differences (flat images: 2 levels; textured, whose
    chroma upsampling differs between the two, on average)."""
    truth = make_insightface(tmp_path / "flat", 32, per_id=4, shuffle=True)
    make_textured(tmp_path / "tex", 32, per_id=4)
    for path, kw in ((tmp_path / "flat", {}), (tmp_path / "tex", {"dali_aug": True})):
        cfg = _cfg(path, tmp_path, **kw)
        cpu = _batches(cfg, batch_size=8)
        loader = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cuda:0")
        gpu = [(x.float().cpu(), y.cpu(), x.device.type, x.dtype, y.device.type) for x, y in loader]
        loader.close()
        assert len(gpu) == len(cpu) == 4
        for (xg, yg, where, dtype, label_where), (xc, yc, _) in zip(gpu, cpu, strict=True):
            assert where == label_where == "cuda" and dtype == torch.float16
            assert yg.dtype == torch.int64 and torch.equal(yg, yc)
            diff = (xg - xc).abs() / LEVEL
            if path.name == "flat":
                assert float(diff.max()) <= 2.5  # fp16 rounding on top of the decoders' 2
                assert (decode_ids(xg) == decode_ids(xc)).all()
                assert (yg.numpy() == truth[decode_ids(xg)]).all()
            else:
                assert float(diff.mean()) < 1.0 and float((diff > 8).float().mean()) < 0.02
    decoder = imgcodec.JpegDecoder(torch.device("cuda:0"), num_threads=1)
    data = [np.frombuffer(encode_jpeg(np.full((112, 112, 3), 90, np.uint8)), np.uint8)]
    (image,) = decoder.decode(data)  # on the caller's current stream
    assert image.device.type == "cuda" and image.shape == (112, 112, 3)
    assert int((image.int() - 90).abs().max()) <= 2


def test_the_trainer_seam_passes_the_decoder_through(tmp_path: Path) -> None:
    """``data.decoder`` in a trainer YAML reaches ``data_pipelines``: the trainer's loader is the
    nvimgcodec one, with the documented labels for its share of the global order."""
    from pfc_ds.train.build import build_loader as trainer_loader
    from pfc_ds.train.config import Config
    from tests.test_train_dali import _cfg as trainer_cfg

    truth = make_insightface(tmp_path / "train", 40, per_id=4)
    raw = trainer_cfg(str(tmp_path / "train"), tmp_path)
    raw["data"].update(decoder="nvimgcodec", image_size=112)
    cfg = Config.from_dict(raw)
    loader, _ = trainer_loader(cfg, rank=1, world_size=2, device="cpu")
    assert isinstance(loader, codec_loader.CodecLoader) and len(loader) == 40 // 16
    order = np.random.default_rng([cfg.data.seed, 0]).permutation(40)
    for step, (images, labels) in enumerate(loader):
        mine = order[step * 16 + 8 : step * 16 + 16]
        assert decode_ids(images).tolist() == mine.tolist()
        assert labels.tolist() == truth[mine].tolist()
    loader.close()
