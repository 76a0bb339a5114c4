"""IJB-B/C 1:1 (``pfc_ds.eval.ijb``): parsing, pooling and TAR@FAR against brute force, and the CLI.

The references are plain loops written from insightface's eval_ijbc.py and sklearn's roc_curve
definition; they share no code with the module. The CLI aligns by default: loose crops with
their landmarks give the features of the aligned crops (``norm_crop``, tested in
test_eval_align.py), and the output says so; ``--no-align`` embeds the crops as they are.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pfc_ds.backbones import get_backbone
from pfc_ds.checkpoint import CheckpointRef, reader
from pfc_ds.eval import ijb
from pfc_ds.eval.align import ARCFACE_112, norm_crop

BIG = 2**53  # ids beyond float64's (and far beyond float32's) exact integers


# --- brute force ------------------------------------------------------------------------------


def _brute_templates(feats, templates, medias) -> dict[int, list[float]]:
    n, dim = len(feats), len(feats[0])
    out = {}
    for t in sorted(set(templates)):
        media_means = []
        for m in sorted({medias[i] for i in range(n) if templates[i] == t}):
            rows = [feats[i] for i in range(n) if templates[i] == t and medias[i] == m]
            media_means.append([sum(r[d] for r in rows) / len(rows) for d in range(dim)])
        total = [sum(mm[d] for mm in media_means) for d in range(dim)]
        norm = math.sqrt(sum(v * v for v in total))
        out[t] = [v / norm for v in total]
    return out


def _brute_image_features(plain, mirror, faceness, flip, norm_score, detector_score):
    rows = []
    for i, row in enumerate(plain):
        v = [float(a) + (float(b) if flip else 0.0) for a, b in zip(row, mirror[i], strict=True)]
        if not norm_score:
            norm = math.sqrt(sum(x * x for x in v))
            v = [x / norm for x in v]
        if detector_score:
            v = [x * float(faceness[i]) for x in v]
        rows.append(v)
    return rows


def _brute_scores(template_feats, p1, p2) -> list[float]:
    return [sum(a * b for a, b in zip(template_feats[s], template_feats[t], strict=True))
            for s, t in zip(p1, p2, strict=True)]  # fmt: skip


def _brute_roc(labels, scores, drop: bool) -> tuple[list[float], list[float]]:
    """sklearn.metrics.roc_curve by its definition: one point per distinct score, descending."""
    points = []
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for y, s in zip(labels, scores, strict=True) if s >= t and y == 1)
        fp = sum(1 for y, s in zip(labels, scores, strict=True) if s >= t and y == 0)
        points.append((fp, tp))
    if drop and len(points) > 2:
        kept = [points[0]]
        for i in range(1, len(points) - 1):
            (f0, t0), (f1, t1), (f2, t2) = points[i - 1], points[i], points[i + 1]
            if (f2 - f1) - (f1 - f0) != 0 or (t2 - t1) - (t1 - t0) != 0:  # not collinear
                kept.append(points[i])
        points = [*kept, points[-1]]
    points = [(0, 0), *points]
    return [f / points[-1][0] for f, _ in points], [t / points[-1][1] for _, t in points]


def _brute_tar(labels, scores, fars, rule: str) -> list[float]:
    if rule == "nearest":  # insightface: reversed curve, min over (|fpr - x|, index)
        fpr, tpr = _brute_roc(labels, scores, drop=True)
        fpr, tpr = fpr[::-1], tpr[::-1]
        return [tpr[min((abs(f - x), i) for i, f in enumerate(fpr))[1]] for x in fars]
    fpr, tpr = _brute_roc(labels, scores, drop=False)
    return [max(t for f, t in zip(fpr, tpr, strict=True) if f <= x) for x in fars]


# --- a miniature protocol ---------------------------------------------------------------------


def _write(path: Path, rows: list[str], crlf: bool = False) -> None:
    nl = "\r\n" if crlf else "\n"
    path.write_bytes((nl.join(rows) + nl + nl + "  " + nl).encode())  # trailing blank lines


def _mini(tmp_path: Path, seed: int = 0, dim: int = 8, landmarks=None) -> dict:
    """12 templates of 4 subjects, 1-3 medias of 1-3 images each; all template pairs. The 5pts
    file gives every image ``landmarks`` (default: the ArcFace template, which aligns a 112 crop
    onto itself)."""
    rng = np.random.default_rng(seed)
    subjects = rng.normal(size=(4, dim))
    names, templates, medias, feats, subject_of = [], [], [], [], {}
    for k in range(12):
        t = BIG + 1000 * k if k % 2 else k + 1  # huge and small ids side by side
        subject_of[t] = k % 4
        for m in range(int(rng.integers(1, 4))):
            media = int(rng.integers(0, 3)) * 100 + m  # media ids are shared across templates
            for _ in range(int(rng.integers(1, 4))):
                names.append(f"img/{len(names)}.png")
                templates.append(t)
                medias.append(media)
                feats.append(subjects[k % 4] + rng.normal(scale=1.3, size=dim))
    tids = sorted(subject_of)
    pairs = [(a, b, int(subject_of[a] == subject_of[b])) for i, a in enumerate(tids)
             for b in tids[i + 1 :]]  # fmt: skip
    faceness = rng.uniform(0.1, 1.0, len(names)).round(3)
    meta = tmp_path / "meta"
    meta.mkdir()
    _write(
        meta / "ijbc_face_tid_mid.txt",
        [f"{n} {t}\t{m}" for n, t, m in zip(names, templates, medias, strict=True)],
        crlf=True,
    )
    _write(meta / "ijbc_template_pair_label.txt", [f"{a}  {b} {y} " for a, b, y in pairs])
    order = list(rng.permutation(len(names)))  # the 5pts file lists the images in another order
    points = ARCFACE_112 if landmarks is None else landmarks
    _write(
        meta / "ijbc_name_5pts_score.txt",
        [f"{names[i]} " + " ".join(f"{v:.4f}" for v in np.ravel(points)) + f" {faceness[i]}"
         for i in order],
    )  # fmt: skip
    return {
        "meta": meta, "names": names, "templates": templates, "medias": medias,
        "feats": np.array(feats), "pairs": pairs, "faceness": faceness, "order": order,
    }  # fmt: skip


def test_parsers_read_exact_ids_from_messy_files(tmp_path: Path) -> None:
    m = _mini(tmp_path)
    names, templates, medias = ijb.read_template_media(m["meta"] / "ijbc_face_tid_mid.txt")
    assert names == m["names"] and templates.dtype == np.int64
    assert templates.tolist() == m["templates"] and medias.tolist() == m["medias"]
    assert (BIG + 1000) in templates.tolist()  # exact: float64 would give 2**53 + 1000 wrong
    p1, p2, labels = ijb.read_template_pairs(m["meta"] / "ijbc_template_pair_label.txt")
    assert list(zip(p1.tolist(), p2.tolist(), labels.tolist(), strict=True)) == m["pairs"]
    assert p1.dtype == p2.dtype == labels.dtype == np.int64
    meta = ijb.load_meta(m["meta"], "IJBC")  # the 5pts order wins; templates follow by name
    assert meta.names == [m["names"][i] for i in m["order"]]
    assert meta.templates.tolist() == [m["templates"][i] for i in m["order"]]
    np.testing.assert_allclose(meta.faceness, m["faceness"][m["order"]], rtol=1e-6)
    assert meta.landmarks.shape == (len(m["names"]), 5, 2)
    np.testing.assert_allclose(meta.landmarks[3], ARCFACE_112, rtol=0, atol=1e-4)


def test_ids_differing_below_float_precision_stay_apart(tmp_path: Path) -> None:
    # float32 parsing (or a float column cast to int) merges 2**24 and 2**24 + 1: one template
    path = tmp_path / "pairs.txt"
    path.write_text(f"{2**24} {2**24 + 1} 1\n{2**24 + 1} {2**53 + 1} 0\n")
    p1, p2, labels = ijb.read_template_pairs(path)
    assert labels.tolist() == [1, 0]
    assert p1.tolist() == [2**24, 2**24 + 1] and p2.tolist() == [2**24 + 1, 2**53 + 1]
    feats, uniq = ijb.template_features(
        np.eye(3), np.array([2**24, 2**24 + 1, 2**53 + 1]), np.zeros(3, np.int64)
    )
    assert uniq.tolist() == [2**24, 2**24 + 1, 2**53 + 1]
    assert ijb.pair_scores(feats, uniq, p1, p2).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2 1\n3 4\n", r"pairs\.txt:2: expected 'template template label', got \['3', '4'\]"),
        ("1 2 1\n3 4.0 0\n", r"pairs\.txt:2: template id '4\.0' is not an integer"),
        # columns in another order: the third column holds template ids, not labels
        ("1 1 2\n0 3 4\n", r"pairs\.txt: 2 labels are not 0/1 \(pair 1: 2\)"),
        ("\n\n", r"pairs\.txt: no records"),
    ],
)
def test_bad_pair_files_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        ijb.read_template_pairs(tmp_path / "pairs.txt")


def test_other_bad_meta(tmp_path: Path) -> None:
    m = _mini(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ijbb_face_tid_mid\.txt: no such IJB meta file"):
        ijb.load_meta(m["meta"], "IJBB")
    bad = tmp_path / "tm.txt"
    bad.write_text("a.jpg 1 2\nb.jpg x 3\n")
    with pytest.raises(ValueError, match=r"tm\.txt:2: template id 'x' is not an integer"):
        ijb.read_template_media(bad)
    with pytest.raises(ValueError, match=r"the image lists differ .*not in the template file"):
        ijb.align_images(["a", "z"], ["a", "b"], np.zeros(2), np.zeros(2), "x")
    feats, uniq = ijb.template_features(m["feats"], np.array(m["templates"]), np.array(m["medias"]))
    with pytest.raises(
        ValueError, match=r"1 templates of the pair list have no images \(e\.g\. \[8\]\)"
    ):
        ijb.pair_scores(feats, uniq, np.array([1, 8]), np.array([3, 3]))


@pytest.mark.parametrize(
    ("flip", "norm_score", "detector_score"),
    [(True, False, False), (True, True, True), (False, True, False), (False, False, True)],
)
def test_pooling_and_scores_match_brute_force(tmp_path: Path, flip, norm_score, detector_score):
    m = _mini(tmp_path, seed=1)
    meta = ijb.load_meta(m["meta"], "IJBC")
    order = m["order"]
    plain = m["feats"][order]
    mirror = np.random.default_rng(9).normal(size=plain.shape)
    result = ijb.score_features(
        meta, plain, mirror, flip=flip, norm_score=norm_score, detector_score=detector_score
    )
    rows = _brute_image_features(plain, mirror, meta.faceness, flip, norm_score, detector_score)
    tf = _brute_templates(rows, meta.templates.tolist(), meta.medias.tolist())
    p1, p2, labels = zip(*m["pairs"], strict=True)
    want = _brute_scores(tf, p1, p2)
    np.testing.assert_allclose(result.scores, want, rtol=0, atol=1e-12)
    assert result.num_templates == 12 and result.num_genuine == 12 and result.num_impostor == 54
    np.testing.assert_array_equal(result.tars, _brute_tar(list(labels), want, ijb.FARS, "nearest"))


def test_tar_at_far_rules_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    labels = (rng.random(600) < 0.3).astype(np.int64)
    scores = np.round(rng.normal(size=600) + 1.5 * labels, 1)  # many ties
    fars = (1e-3, 0.01, 0.05, 0.1, 0.3)
    for rule in ijb.RULES:
        want = _brute_tar(labels.tolist(), scores.tolist(), fars, rule)
        np.testing.assert_array_equal(ijb.tar_at_far(labels, scores, fars, rule), want)
    near = ijb.tar_at_far(labels, scores, fars, "nearest")
    at_most = ijb.tar_at_far(labels, scores, fars, "at-most")
    # nearest may use a point just above the target FAR; at-most never does
    assert near[2] > at_most[2] and near[3] > at_most[3] and near[0] == at_most[0]
    fpr, tpr = _brute_roc(labels.tolist(), scores.tolist(), drop=True)
    got_fpr, got_tpr, thr = ijb.roc_curve(labels, scores)
    np.testing.assert_array_equal(got_fpr, fpr)
    np.testing.assert_array_equal(got_tpr, tpr)
    assert thr[0] == np.inf and (np.diff(thr[1:]) < 0).all()
    with pytest.raises(ValueError, match="both genuine"):
        ijb.tar_at_far(np.ones(3), np.arange(3.0))


# --- the CLI ----------------------------------------------------------------------------------


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_backbone("tiny", 16).eval()


def _direct(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = (torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) - 127.5) / 127.5
    model = _tiny()
    with torch.no_grad():
        return model(x).numpy(), model(torch.flip(x, dims=[3])).numpy()


def _table_row(text: str) -> list[str]:
    return next(line for line in text.splitlines() if line.startswith("TAR (%)")).split()[2:]


def test_cli_end_to_end_and_rescore(tmp_path: Path, monkeypatch, capsys) -> None:
    m = _mini(tmp_path, seed=2)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (len(m["names"]), 112, 112, 3), dtype=np.uint8)
    root = tmp_path / "crops"
    for name, img in zip(m["names"], images, strict=True):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name)
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    ref = CheckpointRef(ckpt, {"step": 1, "image_size": 112})
    monkeypatch.setattr(reader, "load_backbone", lambda src: (_tiny(), ref))
    npz, png = tmp_path / "f.npz", tmp_path / "roc.png"
    argv = ["--meta", str(m["meta"]), "--norm-score", "--detector-score"]
    rc = ijb.main([*argv, "--checkpoint", str(ckpt), "--images", str(root), "--batch-size", "4",
                   "--features", str(npz), "--roc", str(png)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    aligned_line = (
        f"aligned {len(m['names'])} loose crops with their five landmarks onto the ArcFace "
        "template at 112x112 (--no-align: crops already aligned)\n"
    )
    assert out.startswith(aligned_line), out
    assert "IJBC 1:1 N1D1F1, far rule nearest: 12 templates, 66 pairs (12 genuine)" in out

    order = m["order"]
    plain, mirror = _direct(images[order])
    saved = np.load(npz)
    assert saved["names"].tolist() == [m["names"][i] for i in order]
    np.testing.assert_allclose(saved["features"], plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(saved["features_flip"], mirror, rtol=1e-5, atol=1e-5)
    meta = ijb.load_meta(m["meta"], "IJBC")
    rows = _brute_image_features(plain, mirror, meta.faceness, True, True, True)
    tf = _brute_templates(rows, meta.templates.tolist(), meta.medias.tolist())
    p1, p2, labels = zip(*m["pairs"], strict=True)
    scores = _brute_scores(tf, p1, p2)
    tars = _brute_tar(list(labels), scores, ijb.FARS, "nearest")
    assert _table_row(out)[:6] == [f"{100 * t:.2f}" for t in tars]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (600, 450)

    assert ijb.main([*argv, "--rescore", str(npz)]) == 0  # no model, no images
    assert capsys.readouterr().out == out.replace(f"ROC -> {png}\n", "").replace(aligned_line, "")

    assert ijb.main(["--meta", str(m["meta"]), "--rescore", str(npz), "--no-flip",
                     "--far-rule", "at-most"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rows = _brute_image_features(plain, plain, None, False, False, False)
    tf = _brute_templates(rows, meta.templates.tolist(), meta.medias.tolist())
    tars = _brute_tar(list(labels), _brute_scores(tf, p1, p2), ijb.FARS, "at-most")
    assert "N0D0F0, far rule at-most" in out
    assert _table_row(out)[:6] == [f"{100 * t:.2f}" for t in tars]


def test_cli_errors(tmp_path: Path, capsys) -> None:
    m = _mini(tmp_path)
    missing = tmp_path / "nowhere"
    cases = [
        (["--meta", str(missing), "--rescore", str(missing)], f"{missing}: no such features file"),
        (["--meta", str(m["meta"])], "--checkpoint and --images are needed unless --rescore"),
        (["--meta", str(missing), "--checkpoint", str(tmp_path), "--images", str(tmp_path)],
         f"{missing}/ijbc_face_tid_mid.txt: no such IJB meta file"),
        (["--meta", str(m["meta"]), "--checkpoint", str(missing), "--images", str(tmp_path)],
         f"checkpoint {missing} does not exist"),
        (["--meta", str(m["meta"]), "--checkpoint", str(tmp_path), "--images", str(missing)],
         f"{missing} is not a directory"),
    ]  # fmt: skip
    for argv, message in cases:
        assert ijb.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def _loose_crops(tmp_path: Path, m: dict, camera: np.ndarray) -> tuple[Path, np.ndarray]:
    """Every image of ``m`` as a loose crop: a smooth random 112 "face" placed into a larger
    canvas by the similarity ``camera`` (face frame -> canvas); the folder and the faces."""
    rng = np.random.default_rng(5)
    coarse = rng.integers(0, 256, (len(m["names"]), 6, 6, 3), dtype=np.uint8)
    faces = np.stack(
        [
            np.asarray(Image.fromarray(c).resize((112, 112), Image.Resampling.BICUBIC))
            for c in coarse
        ]
    )
    inv = np.linalg.inv(camera)  # Pillow's inverse map, with its half-pixel shift
    a, c = inv[:2, :2], inv[:2, 2] - inv[:2, :2] @ [0.5, 0.5] + 0.5
    root = tmp_path / "loose"
    for name, face in zip(m["names"], faces, strict=True):
        loose = Image.fromarray(face).transform(
            (260, 240), Image.Transform.AFFINE, (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1]),
            resample=Image.Resampling.BILINEAR,
        )  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        loose.save(root / name)
    return root, faces


def test_cli_aligns_loose_crops_by_default(tmp_path: Path, monkeypatch, capsys) -> None:
    """insightface's IJBC/loose_crop: each crop aligned with its landmarks before embedding."""
    angle = np.radians(20.0)
    rot = 1.6 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    camera = np.eye(3)
    camera[:2, :2], camera[:2, 2] = rot, [90.0, 10.0]
    landmarks = ARCFACE_112 @ rot.T + camera[:2, 2]
    m = _mini(tmp_path, seed=2, landmarks=landmarks)
    root, faces = _loose_crops(tmp_path, m, camera)
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    ref = CheckpointRef(ckpt, {"step": 1, "image_size": 112})
    monkeypatch.setattr(reader, "load_backbone", lambda src: (_tiny(), ref))
    argv = ["--meta", str(m["meta"]), "--checkpoint", str(ckpt), "--images", str(root)]
    order = m["order"]
    loose = [np.asarray(Image.open(root / m["names"][i]).convert("RGB")) for i in order]
    aligned = np.stack([norm_crop(im, landmarks) for im in loose])
    resized = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((112, 112), Image.Resampling.BILINEAR))
            for im in loose
        ]
    )
    # The aligned crops are the faces again (up to two bilinear resamplings); resized, not.
    inner = np.s_[:, 2:-2, 2:-2]  # the loose canvas cuts the rotated square's corners
    faces = faces[order].astype(np.float64)
    assert np.abs(aligned[inner] - faces[inner]).mean() < 1.5
    assert np.abs(resized[inner] - faces[inner]).mean() > 20
    for extra, want_images in (([], aligned), (["--no-align"], resized)):
        npz = tmp_path / f"f{len(extra)}.npz"
        assert ijb.main([*argv, *extra, "--features", str(npz)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        if extra:
            assert (
                first
                == f"not aligned (--no-align): {len(loose)} crops taken as aligned, at 112x112"
            )
        else:
            assert first.startswith(f"aligned {len(loose)} loose crops with their five landmarks")
        plain, mirror = _direct(want_images)
        saved = np.load(npz)
        np.testing.assert_allclose(saved["features"], plain, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(saved["features_flip"], mirror, rtol=1e-5, atol=1e-5)


def test_cli_alignment_errors_name_the_file_or_image(tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    ref = CheckpointRef(ckpt, {"step": 1, "image_size": 112})
    monkeypatch.setattr(reader, "load_backbone", lambda src: (_tiny(), ref))
    m = _mini(tmp_path, landmarks=np.full((5, 2), 50.0))  # all five points in one place
    root = tmp_path / "crops"
    for name in m["names"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((112, 112, 3), np.uint8)).save(root / name)
    argv = ["--meta", str(m["meta"]), "--checkpoint", str(ckpt), "--images", str(root)]
    assert ijb.main(argv) == 2
    err = capsys.readouterr().err
    first = m["names"][m["order"][0]]
    assert err.startswith(f"error: {root / first}: landmarks are degenerate"), err
    assert err.count("\n") == 1
    assert ijb.main([*argv, "--no-align"]) == 0  # aligned crops need no landmarks
    capsys.readouterr()
    # Another landmark count (a 68-point file) cannot be aligned here.
    five = m["meta"] / "ijbc_name_5pts_score.txt"
    lines = [ln.split() for ln in five.read_text().splitlines() if ln.strip()]
    five.write_text("".join(f"{f[0]} {' '.join(f[1:9])} {f[-1]}\n" for f in lines))
    assert ijb.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: {five}: 4 landmarks per image; the alignment needs 5 "
        "(--no-align for crops already aligned)\n"
    )
