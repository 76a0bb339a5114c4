"""Embedding images as training saw them: ``pfc_ds.eval.embedder`` and ``python -m pfc_ds.embed``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.faces import generate
from data_pipelines.scan import scan_rec
from pfc_ds import embed
from pfc_ds.backbones import get_backbone
from pfc_ds.checkpoint import CheckpointRef, reader
from pfc_ds.eval import (
    embed_images,
    embed_shard,
    evaluate,
    evaluate_bin,
    gather_embeddings,
    load_bin,
    shard_bounds,
    synthetic_bin,
)
from tests.dist import run_distributed


def _model(seed: int = 0, dim: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_backbone("tiny", dim).eval()


def _direct(model: torch.nn.Module, images: np.ndarray, flip: bool = True) -> np.ndarray:
    """One plain model call on (x - 127.5) / 127.5 in NCHW, plus one on the mirrored batch."""
    x = (torch.tensor(np.array(images), dtype=torch.float32).permute(0, 3, 1, 2) - 127.5) / 127.5
    with torch.no_grad():
        e = model(x)
        if flip:
            e = e + model(torch.flip(x, dims=[3]))
    return e.numpy()


def _decode(path: Path | bytes, size: int = 112) -> np.ndarray:
    with Image.open(path if isinstance(path, Path) else io.BytesIO(path)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    files = {
        "b/2.jpg": (112, 112),
        "a/x/1.png": (112, 112),
        "a/0.PNG": (112, 112),
        "c.jpeg": (90, 100),  # another size: resized to 112
        "b/10.jpg": (112, 112),
    }
    for name, (h, w) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(path, format="PNG" if name.lower().endswith("png") else "JPEG")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def fake_checkpoint(monkeypatch, tmp_path: Path) -> Path:
    """``load_backbone`` returns a random tiny model: the CLIs run without a DeepSpeed run."""
    ckpt = tmp_path / "run"
    ckpt.mkdir()

    def fake_load(src):
        meta = {"backbone": "tiny", "embedding_size": 32, "step": 7, "image_size": 112}
        return _model(), CheckpointRef(Path(src), meta)

    monkeypatch.setattr(reader, "load_backbone", fake_load)
    return ckpt


def test_embed_images_matches_direct_calls() -> None:
    model = _model()
    images = np.random.default_rng(1).integers(0, 256, (7, 112, 112, 3), dtype=np.uint8)
    want = _direct(model, images)
    got = embed_images(model, images, batch_size=3)
    assert got.dtype == np.float32 and got.shape == (7, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    batches = iter([images[:2], images[2:]])  # a stream of batches of any size
    np.testing.assert_allclose(embed_images(model, batches, batch_size=4), got, atol=1e-6)
    plain = embed_images(model, images, batch_size=5, flip=False)
    np.testing.assert_allclose(plain, _direct(model, images, flip=False), rtol=1e-5, atol=1e-5)
    model.train()
    embed_images(model, images[:1])
    assert model.training  # restored after evaluating in eval mode
    with pytest.raises(ValueError, match=r"expected uint8 RGB images \(N, H, W, 3\)"):
        embed_images(model, images.astype(np.float32))


def test_half_precision_model_gets_half_inputs() -> None:
    model = _model()
    images = np.random.default_rng(2).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    want = embed_images(model, images)
    got = embed_images(model.to(torch.bfloat16), images)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())


def test_evaluate_bin_is_evaluate_of_flip_summed_embeddings(tmp_path: Path) -> None:
    model = _model(3)
    path = synthetic_bin(tmp_path / "synth.bin", num_pairs=30, first_identity=100)
    data = load_bin(path)
    result = evaluate_bin(model, path, batch_size=16)
    emb = _direct(model, data.images)
    want = evaluate(emb, data.issame)
    assert result.accuracy == pytest.approx(want.accuracy, abs=1e-12)
    assert result.tar_at_far == pytest.approx(want.tar_at_far, abs=1e-12)
    assert result.num_pairs == 30 and 0.0 < result.accuracy <= 1.0
    # insightface's XNorm: the mean norm of the single (unflipped and flipped) embeddings
    views = np.concatenate([_direct(model, data.images, flip=False),
                            _direct(model, data.images[:, :, ::-1], flip=False)])  # fmt: skip
    assert result.mean_norm == pytest.approx(np.linalg.norm(views, axis=1).mean(), rel=1e-5)
    assert evaluate_bin(model, data).accuracy == result.accuracy  # a decoded set works too


def test_embed_shard_covers_every_row_once() -> None:
    model = _model(4)
    images = np.random.default_rng(5).integers(0, 256, (7, 112, 112, 3), dtype=np.uint8)
    full = embed_images(model, images)
    assert [shard_bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(2, 3, 2) == (2, 2)  # more ranks than rows: an empty share
    parts = [embed_shard(model, images, r, 3, batch_size=2) for r in range(3)]
    assert [p.shape[0] for p in parts] == [3, 2, 2]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-5)


def _gather_worker(rank: int, world_size: int) -> np.ndarray:
    model = _model(4)
    images = np.random.default_rng(5).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    local = embed_shard(model, images, rank, world_size, batch_size=2)
    return gather_embeddings(torch.from_numpy(local), 5).numpy()


def test_gather_embeddings_two_ranks() -> None:
    images = np.random.default_rng(5).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    full = embed_images(_model(4), images)
    for got in run_distributed(_gather_worker, 2):
        assert got.shape == (5, 32)
        np.testing.assert_allclose(got, full, atol=1e-5)


def test_embed_folder_cli(folder: Path, fake_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "emb.npy"
    rc = embed.main(["--checkpoint", str(fake_checkpoint), "--folder", str(folder),
                     "--output", str(out), "--batch-size", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    names = ["a/0.PNG", "a/x/1.png", "b/10.jpg", "b/2.jpg", "c.jpeg"]
    assert (tmp_path / "out" / "emb.txt").read_text().splitlines() == names
    emb = np.load(out)
    images = np.stack([_decode(folder / n) for n in names])
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, _direct(_model(), images), rtol=1e-5, atol=1e-5)
    assert f"5 embeddings of size 32 -> {out}" in capsys.readouterr().out

    rc = embed.main(["--checkpoint", str(fake_checkpoint), "--folder", str(folder),
                     "--output", str(tmp_path / "plain"), "--no-flip"])  # fmt: skip
    assert rc == 0
    plain = np.load(tmp_path / "plain.npy")
    np.testing.assert_allclose(plain, _direct(_model(), images, flip=False), atol=1e-5)


def test_embed_rec_cli(fake_checkpoint: Path, tmp_path: Path) -> None:
    generate(str(tmp_path / "train"), ids=3, per_id=2, seed=1, workers=1)
    out = tmp_path / "rec.npy"
    rc = embed.main(["--checkpoint", str(fake_checkpoint), "--rec", str(tmp_path / "train.rec"),
                     "--output", str(out)])  # fmt: skip
    assert rc == 0
    scan = scan_rec(tmp_path / "train")
    buf = (tmp_path / "train.rec").read_bytes()
    images = np.stack([_decode(bytes(scan.image_bytes(buf, i))) for i in range(6)])
    np.testing.assert_array_equal(np.load(tmp_path / "rec.labels.npy"), scan.labels)
    assert sorted(np.load(tmp_path / "rec.labels.npy").tolist()) == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(np.load(out), _direct(_model(), images), rtol=1e-5, atol=1e-5)


def test_embed_cli_errors(folder: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    cases = [
        (["--checkpoint", str(missing), "--folder", str(folder)], f"checkpoint {missing} does not exist"),
        (["--checkpoint", str(tmp_path), "--folder", str(missing)], f"{missing} is not a directory"),
        (["--checkpoint", str(tmp_path), "--rec", str(missing)], f"{missing}.rec not found"),
    ]  # fmt: skip
    for argv, message in cases:
        assert embed.main([*argv, "--output", str(tmp_path / "e.npy")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "e.npy").exists()


class _Probe(torch.nn.Module):
    """Records the autograd mode its forward runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return self.fc(x.mean(dim=(2, 3)))


def test_zero3_partitioned_models_run_under_no_grad() -> None:
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    probe = _Probe()
    embed_images(probe, images)
    probe.fc.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    embed_images(probe, images)
    # inference tensors would break the next ZeRO-3 training backward, so no_grad there
    assert probe.modes == [(True, False), (False, False)]


def test_embed_landmarks_cli_aligns_each_face(fake_checkpoint: Path, tmp_path: Path, capsys):
    """``--landmarks``: one line per face (an image may hold two), with or without a trailing
    detector score; each face is ``norm_crop``-ed with its points, in the file's order."""
    from pfc_ds.eval.align import ARCFACE_112, norm_crop

    rng = np.random.default_rng(3)
    root = tmp_path / "photos"
    (root / "g").mkdir(parents=True)
    images = {
        "g/one.png": rng.integers(0, 256, (200, 240, 3), dtype=np.uint8),
        "two.jpg": rng.integers(0, 256, (300, 260, 3), dtype=np.uint8),
    }
    for name, img in images.items():
        Image.fromarray(img).save(root / name)
    faces = [  # (path, landmarks): a face scaled 1.5x, and two faces in one photo
        ("g/one.png", ARCFACE_112 * 1.5 + [20.0, 10.0]),
        ("two.jpg", ARCFACE_112 + np.array([5.0, 7.0])),
        ("two.jpg", ARCFACE_112[:, ::-1] * [1.0, -1.0] + [100.0, 250.0]),  # rotated 90 degrees
    ]
    lines = [f"{n} " + " ".join(f"{v:.3f}" for v in p.ravel()) for n, p in faces]
    lines[1] += " 0.98"  # insightface's 5pts layout: a detector score at the end
    marks = tmp_path / "faces.txt"
    marks.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "emb.npy"
    argv = ["--checkpoint", str(fake_checkpoint), "--folder", str(root), "--output", str(out)]
    assert embed.main([*argv, "--landmarks", str(marks)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.strip() == (
        f"3 embeddings of size 32 -> {out}, names in {tmp_path / 'emb.txt'}; each face aligned "
        f"with its five landmarks from {marks}"
    )
    assert (tmp_path / "emb.txt").read_text().splitlines() == [n for n, _ in faces]
    decoded = {n: np.asarray(Image.open(root / n).convert("RGB")) for n in images}
    crops = np.stack([norm_crop(decoded[n], np.round(p, 3)) for n, p in faces])
    np.testing.assert_allclose(np.load(out), _direct(_model(), crops), rtol=1e-5, atol=1e-5)

    cases = [
        ("g/one.png 1 2 3\n", f"{marks}:1: expected 'path x1 y1 ... x5 y5 [score]', got 4 fields"),
        ("a 1 2 3 4 5 6 7 8 9 x\n", f"{marks}:1: non-numeric landmark"),
        ("\n", f"{marks}: no faces listed"),
        (f"nope.png {' '.join(['1'] * 10)}\n", f"1 of 1 images are missing in {root}"),
        ("g/one.png " + " ".join(["9"] * 10) + "\n", f"{root / 'g/one.png'} (face 1): landmarks "
         "are degenerate"),
    ]  # fmt: skip
    for text, message in cases:
        marks.write_text(text)
        assert embed.main([*argv, "--landmarks", str(marks)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    rec = ["--checkpoint", str(fake_checkpoint), "--rec", str(tmp_path / "x"), "--output", str(out)]
    assert embed.main([*rec, "--landmarks", str(marks)]) == 2
    assert "--landmarks needs --folder" in capsys.readouterr().err
