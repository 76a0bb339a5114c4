"""insightface's verification protocol (``pfc_ds.eval.verification``) against a brute force.

The reference below is a plain-loop transcription of insightface's ``calculate_roc`` /
``calculate_val`` (explicit fold index lists, one pass per threshold, scipy's ``slinear``
interpolation written out), sharing no code with the module under test.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.jpeg import encode_jpeg
from pfc_ds.eval.bins import BinError, load_bin, read_bin, synthetic_bin, write_bin
from pfc_ds.eval.verification import evaluate, interp_slinear, kfold_bounds


def _brute_force(emb: np.ndarray, issame: np.ndarray, nfolds: int) -> dict[str, float]:
    rows = [[float(v) for v in row] for row in emb]
    unit = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        unit.append([v / norm for v in row] if norm > 0 else row)
    n = len(issame)
    dist = [
        sum((a - b) ** 2 for a, b in zip(unit[2 * i], unit[2 * i + 1], strict=True))
        for i in range(n)
    ]
    same = [bool(x) for x in issame]
    folds = []  # (train indices, test indices) as sklearn's KFold(shuffle=False) makes them
    start = 0
    for f in range(nfolds):
        size = n // nfolds + (1 if f < n % nfolds else 0)
        test = list(range(start, start + size))
        train = [i for i in range(n) if i not in test] if nfolds > 1 else test
        folds.append((train, test))
        start += size

    def accuracy(t: float, idx: list[int]) -> float:
        correct = sum(1 for i in idx if (dist[i] < t) == same[i])
        return correct / len(idx)

    def val_far(t: float, idx: list[int]) -> tuple[float, float]:
        n_same = sum(1 for i in idx if same[i])
        n_diff = len(idx) - n_same
        ta = sum(1 for i in idx if same[i] and dist[i] < t)
        fa = sum(1 for i in idx if not same[i] and dist[i] < t)
        return (ta / n_same if n_same else 0.0), (fa / n_diff if n_diff else 0.0)

    accs, chosen, vals = [], [], []
    roc_thresholds = list(np.arange(0, 4, 0.01))
    val_thresholds = list(np.arange(0, 4, 0.001))
    for train, test in folds:
        best_i, best_acc = 0, -1.0
        for i, t in enumerate(roc_thresholds):
            a = accuracy(t, train)
            if a > best_acc:  # first maximum, as np.argmax
                best_i, best_acc = i, a
        chosen.append(roc_thresholds[best_i])
        accs.append(accuracy(roc_thresholds[best_i], test))

        diff_train = [dist[i] for i in train if not same[i]]
        far_train = [sum(1 for d in diff_train if d < t) / len(diff_train) for t in val_thresholds]
        if max(far_train) >= 1e-3:
            # scipy interp1d(kind="slinear"): last segment j <= n-2 with far[j] <= target
            j = 0
            for k in range(len(far_train) - 1):
                if far_train[k] <= 1e-3:
                    j = k
            xa, xb = far_train[j], far_train[j + 1]
            if xa == xb:
                threshold = 0.0
            else:
                w = 1.0 / (xb - xa)
                threshold = val_thresholds[j] * (w * (xb - 1e-3)) + val_thresholds[j + 1] * (
                    w * (1e-3 - xa)
                )
        else:
            threshold = 0.0
        vals.append(val_far(threshold, test)[0])
    mean = sum(accs) / nfolds
    return {
        "accuracy": mean,
        "accuracy_std": math.sqrt(sum((a - mean) ** 2 for a in accs) / nfolds),
        "threshold": sum(chosen) / nfolds,
        "tar_at_far": sum(vals) / nfolds,
        "tar_at_far_std": float(np.std(vals)),
    }


def _pairs(
    num_pairs: int, seed: int, same_cos: float, diff_cos: float, noise: float, dim: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose cosine is drawn around ``same_cos`` / ``diff_cos``, rows of random norm."""
    rng = np.random.default_rng(seed)
    issame = rng.random(num_pairs) < 0.5
    emb = np.zeros((2 * num_pairs, dim))
    for i, s in enumerate(issame):
        u = rng.normal(size=dim)
        u /= np.linalg.norm(u)
        w = rng.normal(size=dim)
        w -= (w @ u) * u
        w /= np.linalg.norm(w)
        c = np.clip(rng.normal(same_cos if s else diff_cos, noise), -1, 1)
        emb[2 * i] = u
        emb[2 * i + 1] = c * u + math.sqrt(1 - c * c) * w
    emb *= rng.uniform(5, 30, size=(2 * num_pairs, 1))
    return emb.astype(np.float32), issame


def _assert_matches(emb: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> None:
    got = evaluate(emb, issame, nfolds)
    want = _brute_force(emb, issame, nfolds)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, abs=1e-12, rel=0), key
    assert got.far == 1e-3 and got.num_pairs == len(issame)
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    assert got.mean_norm == pytest.approx(float(norms.mean()), rel=1e-12)


def test_overlapping_pairs_uneven_folds() -> None:
    emb, issame = _pairs(203, seed=1, same_cos=0.5, diff_cos=0.15, noise=0.2)
    _assert_matches(emb, issame)
    r = evaluate(emb, issame)
    assert 0.7 < r.accuracy < 0.99 and r.accuracy_std > 0
    assert 0.2 < r.tar_at_far < 0.9


def test_face_like_pairs_other_fold_counts() -> None:
    emb, issame = _pairs(57, seed=2, same_cos=0.7, diff_cos=0.0, noise=0.15)
    _assert_matches(emb, issame, nfolds=10)
    _assert_matches(emb, issame, nfolds=4)
    _assert_matches(emb, issame, nfolds=1)


def test_perfectly_separable_pairs() -> None:
    emb, issame = _pairs(120, seed=3, same_cos=0.9, diff_cos=-0.1, noise=0.02)
    _assert_matches(emb, issame)
    r = evaluate(emb, issame)
    assert r.accuracy == 1.0 and r.accuracy_std == 0.0 and r.tar_at_far == 1.0
    # 0.2 = 2 - 2 * 0.9 sits between the classes: the first perfect threshold is above the
    # largest genuine distance (about 0.2) and below the impostors (about 2.2)
    assert 0.1 < r.threshold < 2.3


def test_random_embeddings_are_at_chance() -> None:
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(2 * 150, 8)).astype(np.float32)
    issame = rng.random(150) < 0.5
    _assert_matches(emb, issame)
    assert 0.35 < evaluate(emb, issame).accuracy < 0.65


def test_far_never_reached_gives_threshold_zero() -> None:
    # Impostors are antipodal (distance 4), so no threshold of [0, 4) accepts any of them:
    # insightface then uses threshold 0 and TAR is 0, while accuracy is perfect.
    rng = np.random.default_rng(5)
    u = rng.normal(size=(40, 6))
    issame = np.arange(40) % 2 == 0
    emb = np.empty((80, 6))
    emb[0::2] = u
    emb[1::2] = np.where(issame[:, None], 2 * u + 0.01 * rng.normal(size=u.shape), -u)
    _assert_matches(emb, issame)
    r = evaluate(emb, issame)
    assert r.accuracy == 1.0 and r.tar_at_far == 0.0 and r.far_achieved == 0.0


def test_zero_rows_stay_zero() -> None:
    emb, issame = _pairs(30, seed=6, same_cos=0.6, diff_cos=0.0, noise=0.2)
    emb[4] = 0.0
    _assert_matches(emb, issame)


def test_kfold_bounds_are_sklearns() -> None:
    assert kfold_bounds(23, 10) == [
        (0, 3), (3, 6), (6, 9), (9, 11), (11, 13), (13, 15), (15, 17), (17, 19), (19, 21), (21, 23)
    ]  # fmt: skip
    assert kfold_bounds(6000, 10)[3] == (1800, 2400)
    assert kfold_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="3 pairs cannot be split into 10 folds"):
        kfold_bounds(3, 10)


def test_interp_slinear_follows_scipy_bspline() -> None:
    x = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
    y = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert interp_slinear(x, y, 0.25) == 1.5  # between the last 0.0 and the first 0.5
    assert interp_slinear(x, y, 0.5) == 3.0  # from the last knot equal to x_new
    assert interp_slinear(x, y, 1.0) == 4.0
    assert interp_slinear(x, y, 0.0) == 1.0
    # a zero-width last segment: scipy's de Boor weights are 0, so the result is 0
    assert interp_slinear(np.array([0.0, 1.0, 1.0]), np.array([0.0, 1.0, 2.0]), 1.0) == 0.0


def test_bad_input_is_named() -> None:
    emb, issame = _pairs(20, seed=7, same_cos=0.6, diff_cos=0.0, noise=0.2)
    with pytest.raises(ValueError, match=r"do not hold 2 rows for each of 19 pairs"):
        evaluate(emb, issame[:19])
    emb[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 embedding rows are not finite \(first: row 7\)"):
        evaluate(emb, issame)


# --- .bin files -------------------------------------------------------------------------------


def _png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def _images(n: int, size: int = 112, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2 ``pickle.dump((images, issame), f, protocol=2)`` writes: str = BINSTRING."""
    out = bytearray(b"\x80\x02](")  # PROTO 2, EMPTY_LIST, MARK
    for data in images:
        out += b"T" + struct.pack("<i", len(data)) + data  # BINSTRING
    out += b"e]("  # APPENDS, EMPTY_LIST, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    return bytes(out + b"e\x86.")  # APPENDS, TUPLE2, STOP


def test_python2_bin_loads_with_exact_bytes(tmp_path: Path) -> None:
    rgbs = _images(4)
    pngs = [_png(x) for x in rgbs]
    path = tmp_path / "lfw.bin"
    path.write_bytes(_py2_pickle(pngs, [True, False]))
    with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
        pickle.load(f)  # why insightface falls back to encoding="bytes"
    images, issame = read_bin(path)
    assert images == pngs and issame.tolist() == [True, False]
    data = load_bin(path)
    assert data.name == "lfw" and data.num_pairs == 2 and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images, np.stack(rgbs))  # PNG is lossless


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_and_bytearray_items(tmp_path: Path, protocol: int) -> None:
    pngs = [_png(x) for x in _images(4, seed=1)]
    items = [np.frombuffer(pngs[0], np.uint8), np.bytes_(pngs[1]), bytearray(pngs[2]), pngs[3]]
    path = tmp_path / "mixed.bin"
    path.write_bytes(pickle.dumps((items, np.array([False, True])), protocol=protocol))
    images, issame = read_bin(path)
    assert images == pngs and issame.tolist() == [False, True]


def test_write_bin_round_trip_and_resize(tmp_path: Path) -> None:
    rgbs = _images(4, size=96, seed=2)
    path = write_bin(tmp_path / "small.bin", [_png(x) for x in rgbs], [1, 0])
    with open(path, "rb") as f:
        assert pickle.load(f)[1] == [True, False]  # insightface's plain pickle.load reads it
    assert load_bin(path, image_size=96).images.tolist() == np.stack(rgbs).tolist()
    big = load_bin(path, image_size=112)
    assert big.images.shape == (4, 112, 112, 3)
    want = np.asarray(Image.fromarray(rgbs[3]).resize((112, 112), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(big.images[3], want)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_bad_bins_name_the_file(tmp_path: Path) -> None:
    png = _png(_images(1)[0])
    with pytest.raises(FileNotFoundError, match=r"nope\.bin: no such verification \.bin file"):
        read_bin(tmp_path / "nope.bin")
    cases = {
        "jpeg.bin": (encode_jpeg(_images(1)[0]), r"not a readable pickle"),
        "dict.bin": (pickle.dumps({"a": 1}), r"expected a pickled \(images, issame\) pair, got dict"),
        "count.bin": (pickle.dumps(([png] * 3, [True, False])), r"3 images for 2 pairs \(expected 4\)"),
        "labels.bin": (pickle.dumps(([png] * 2, ["yes"])), r"issame is not a flat list of booleans"),
        "item.bin": (pickle.dumps(([png, 7], [True])), r"image 1 is a int, not encoded bytes"),
        "evil.bin": (pickle.dumps(([png, png], _Evil())), r"refusing to load global .*getcwd"),
        "empty.bin": (pickle.dumps(([], [])), r"holds no pairs"),
    }  # fmt: skip
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BinError, match=re.escape(str(tmp_path / name)) + ".*" + message):
            read_bin(tmp_path / name)
    (tmp_path / "broken.bin").write_bytes(pickle.dumps(([png, png, png[:50], png], [1, 0])))
    with pytest.raises(BinError, match=r"broken\.bin: image 2 does not decode"):
        load_bin(tmp_path / "broken.bin")


def test_synthetic_bin_renders_held_out_identities(tmp_path: Path, monkeypatch) -> None:
    made: dict[int, int] = {}  # id(face) -> identity
    rendered: list[int] = []
    from data_pipelines import faces

    real_prototype, real_view = faces.prototype, faces.view

    def spy_prototype(identity: int, seed: int = 0):
        assert seed == 3
        face = real_prototype(identity, seed)
        made[id(face)] = identity
        return face

    def spy_view(face, rng):
        rendered.append(made[id(face)])
        return real_view(face, rng)

    monkeypatch.setattr(faces, "prototype", spy_prototype)
    monkeypatch.setattr(faces, "view", spy_view)
    path = synthetic_bin(tmp_path / "synth.bin", num_pairs=30, first_identity=500, seed=3)
    assert all(500 <= i < 530 for i in rendered)  # never one of the training ids 0..499
    assert len(made) == len(set(rendered))  # each prototype built once, then reused
    data = load_bin(path)
    assert data.issame.tolist() == [i % 2 == 0 for i in range(30)]
    assert [a == b for a, b in zip(rendered[0::2], rendered[1::2], strict=True)] == (
        data.issame.tolist()
    )
    assert data.images.shape == (60, 112, 112, 3)
    assert synthetic_bin(tmp_path / "again.bin", 30, 500, seed=3).read_bytes() == path.read_bytes()
    small = load_bin(synthetic_bin(tmp_path / "s64.bin", 4, 500, seed=3, image_size=64), 64)
    assert small.images.shape == (8, 64, 64, 3)


# --- python -m pfc_ds.eval ----------------------------------------------------------------------


def test_eval_cli_prints_one_line_per_set(tmp_path: Path, monkeypatch, capsys) -> None:
    import torch

    from pfc_ds.backbones import get_backbone
    from pfc_ds.checkpoint import CheckpointRef, reader
    from pfc_ds.eval import evaluate_bin
    from pfc_ds.eval.__main__ import main

    def tiny():
        torch.manual_seed(0)
        return get_backbone("tiny", 64).eval()

    meta = {"backbone": "tiny", "embedding_size": 64, "step": 300, "image_size": 56}
    monkeypatch.setattr(
        reader, "load_backbone", lambda src: (tiny(), CheckpointRef(tmp_path / "run", meta))
    )
    a = synthetic_bin(tmp_path / "synth_a.bin", 40, first_identity=300, seed=1)
    b = synthetic_bin(tmp_path / "synth_b.bin", 23, first_identity=400, seed=2)
    assert main(["--checkpoint", str(tmp_path), "--bin", str(a), "--bin", str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (a, b), strict=True):
        r = evaluate_bin(tiny(), load_bin(path, 56))  # the checkpoint's 56 px input size
        assert line == (
            f"{path.stem}: accuracy {r.accuracy:.4f} ± {r.accuracy_std:.4f}, "
            f"threshold {r.threshold:.3f}, TAR@FAR=1e-3 {r.tar_at_far:.4f}"
        )


def test_eval_cli_errors(tmp_path: Path, capsys) -> None:
    import torch

    from pfc_ds.eval.__main__ import main

    good = synthetic_bin(tmp_path / "ok.bin", 10, first_identity=0)
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    missing = tmp_path / "nowhere"
    cases = [
        (["--checkpoint", str(tmp_path), "--bin", str(good), "--bin", str(missing / "lfw.bin")],
         f"{missing / 'lfw.bin'}: no such verification .bin file"),
        (["--checkpoint", str(tmp_path), "--bin", str(tmp_path / "bad.bin")],
         f"{tmp_path / 'bad.bin'}: not a readable pickle (UnpicklingError"),
        (["--checkpoint", str(missing), "--bin", str(good)], f"checkpoint {missing} does not exist"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", str(tmp_path), "--bin", str(good), "--device", "cuda"],
                      "--device cuda: CUDA is not available"))  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
