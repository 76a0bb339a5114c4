"""Embed every image of a folder or an insightface ``.rec`` with a checkpoint's backbone.

    python -m pfc_ds.embed --checkpoint OUTPUT_OR_TAG (--folder DIR | --rec PREFIX) \\
        --output F.npy [--landmarks FILE] [--batch-size 64] [--no-flip] [--device cpu]

Writes ``F.npy``: float32 ``(N, D)`` raw embeddings, flip-summed unless ``--no-flip``, *not*
L2-normalised (normalise them for cosine similarity; the norm is a quality signal). ``--folder``:
every image file below DIR, recursively, sorted by relative path; ``F.txt`` lists those paths
(relative to DIR, ``/``-separated) one per line in row order. ``--rec``: every image record in
file order (header, identity and unreadable records are skipped, as the trainer skips them;
the count is reported), with the records' labels in ``F.labels.npy`` (int64).

``--landmarks FILE`` (with ``--folder``) embeds faces of your own detections: one line per face,
``PATH x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]`` (whitespace-separated; PATH relative to DIR; the
five points in pixels: left eye, right eye, nose tip, left and right mouth corner, as
insightface's detectors give them; a trailing detector score, as in insightface's
``*_name_5pts_score.txt``, is ignored). Each face is aligned onto the ArcFace template
(``pfc_ds.eval.align.norm_crop``, insightface's alignment) before embedding; the rows of
``F.npy`` and the lines of ``F.txt`` follow FILE's lines (an image with two faces has two).

Images decode with Pillow on a few threads (a one-pass tool gains little from the trainer's
DALI pipelines) and are resized to the model's input size when they differ from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipelines.folder import IMAGE_EXTENSIONS
from data_pipelines.insightface import split_prefix
from pfc_ds.eval.align import norm_crop
from pfc_ds.eval.embedder import decoded_batches, embed_images, load_checkpoint_model


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files below ``folder`` (any depth) as sorted ``/``-separated relative paths."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    found = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    if not found:
        raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def embed_folder(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    image_size: int = 112,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    *,
    progress: bool | None = False,
) -> tuple[np.ndarray, list[str]]:
    """(embeddings, relative paths) of every image below ``folder``, in ``list_images`` order."""
    names = list_images(folder)
    root = Path(folder)
    batches = decoded_batches(
        len(names),
        lambda i: (root / names[i]).read_bytes(),
        image_size,
        batch_size,
        lambda i: str(root / names[i]),
    )
    emb = embed_images(
        model, batches, batch_size, device, flip, progress=progress, total=len(names)
    )
    return emb, names


def read_landmarks(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(paths, float64 (N, 5, 2) landmarks)`` of a ``--landmarks`` file, one face per line;
    a bad line is a ``ValueError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such landmarks file")
    names, points = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (11, 12):
                raise ValueError(f"{path}:{n}: expected 'path x1 y1 ... x5 y5 [score]', "
                                 f"got {len(fields)} fields")  # fmt: skip
            try:
                values = [float(v) for v in fields[1:11]]
            except ValueError:
                raise ValueError(f"{path}:{n}: non-numeric landmark in {fields[1:11]}") from None
            names.append(fields[0])
            points.append(values)
    if not names:
        raise ValueError(f"{path}: no faces listed")
    return names, np.array(points, dtype=np.float64).reshape(-1, 5, 2)


def embed_faces(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    names: list[str],
    landmarks: np.ndarray,
    image_size: int = 112,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    *,
    progress: bool | None = False,
) -> np.ndarray:
    """Embeddings of the faces ``folder/names[i]`` aligned with ``landmarks[i]`` (5 x 2)."""
    root = Path(folder)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(names)} images are missing in {root} (first: {missing[0]})"
        )
    batches = decoded_batches(
        len(names),
        lambda i: (root / names[i]).read_bytes(),
        image_size,
        batch_size,
        lambda i: f"{root / names[i]} (face {i + 1})",
        crop=lambda i, image: norm_crop(image, landmarks[i], image_size),
    )
    return embed_images(
        model, batches, batch_size, device, flip, progress=progress, total=len(names)
    )


def embed_rec(
    model: torch.nn.Module,
    prefix: str | os.PathLike,
    image_size: int = 112,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    *,
    progress: bool | None = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(embeddings, int64 labels, records skipped) of every image record of a ``.rec``."""
    from data_pipelines.scan import scan_rec

    scan = scan_rec(prefix)
    if scan.num_images == 0:
        raise ValueError(f"{scan.rec_path} holds no readable image records")
    size = os.path.getsize(scan.rec_path)
    buf = np.memmap(scan.rec_path, dtype=np.uint8, mode="r", shape=(size,))
    batches = decoded_batches(
        scan.num_images,
        lambda i: bytes(scan.image_bytes(buf, i)),
        image_size,
        batch_size,
        lambda i: f"{scan.rec_path} key={int(scan.keys[i])} offset={int(scan.offsets[i])}",
    )
    emb = embed_images(
        model, batches, batch_size, device, flip, progress=progress, total=scan.num_images
    )
    return emb, scan.labels.copy(), len(scan.problems)


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.embed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="training output folder or tag folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", type=Path, help="folder of images (searched recursively)")
    src.add_argument("--rec", help="insightface PREFIX (PREFIX.rec + PREFIX.idx)")
    p.add_argument("--output", required=True, type=Path, help="F.npy (F.txt / F.labels.npy too)")
    p.add_argument(
        "--landmarks",
        type=Path,
        help="with --folder: a file of 'PATH x1 y1 ... x5 y5 [score]' lines; each face is "
        "aligned onto the ArcFace template with its five points before embedding",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="do not add the mirrored image's")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    base = args.output.with_suffix("") if args.output.suffix == ".npy" else args.output
    out = base.with_name(base.name + ".npy")
    flip = not args.no_flip
    try:
        faces = None
        if args.landmarks is not None:
            if args.folder is None:
                raise ValueError("--landmarks needs --folder (the images its paths are under)")
            if not args.folder.is_dir():
                raise FileNotFoundError(f"{args.folder} is not a directory")
            faces = read_landmarks(args.landmarks)  # fail before loading the model
        elif args.folder is not None:
            list_images(args.folder)  # fail before loading the model
        else:
            prefix = split_prefix(args.rec)
            for path in (prefix + ".rec", prefix + ".idx"):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} not found (--rec takes PREFIX of PREFIX.rec)")
        model, size, _ = load_checkpoint_model(args.checkpoint, args.device)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.folder is not None:
            if faces is not None:
                names = faces[0]
                emb = embed_faces(model, args.folder, *faces, size, args.batch_size,
                                  args.device, flip, progress=None)  # fmt: skip
            else:
                emb, names = embed_folder(
                    model, args.folder, size, args.batch_size, args.device, flip, progress=None
                )
            names_path = base.with_name(base.name + ".txt")
            names_path.write_text("".join(f"{n}\n" for n in names))
            extra = f", names in {names_path}"
            if faces is not None:
                extra += f"; each face aligned with its five landmarks from {args.landmarks}"
        else:
            emb, labels, skipped = embed_rec(
                model, args.rec, size, args.batch_size, args.device, flip, progress=None
            )
            labels_path = base.with_name(base.name + ".labels.npy")
            _save(labels_path, labels)
            extra = f", labels in {labels_path}"
            if skipped:
                extra += f" ({skipped} unreadable records skipped)"
        _save(out, emb)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{emb.shape[0]} embeddings of size {emb.shape[1]} -> {out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
