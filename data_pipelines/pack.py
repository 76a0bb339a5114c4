"""Pack a folder of identity folders: ``python -m data_pipelines.pack SRC_DIR OUT_PREFIX``.

Writes ``OUT_PREFIX.rec``/``.idx`` in insightface's layout (header, images, identity records), a
``property`` file and ``OUT_PREFIX.labels.json`` (label -> folder name). Image order is shuffled
with ``--seed`` so that readers which only shuffle through a buffer (DALI's) still mix
identities; ``--sorted`` keeps insightface's identity-grouped order and exact identity ranges.
Bytes are copied as they are unless ``--resize`` re-encodes to 112x112. ``property`` records
the size the images share, or ``C,mixed`` when they differ: the loader then asks for
``data.resize: true`` instead of failing mid-run on a batch of mismatched images.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections import Counter
from collections.abc import Iterator
from functools import partial

import numpy as np
from PIL import Image
from tqdm import tqdm

from .folder import save_label_map, scan_folder
from .insightface import IMAGE_SIZE, split_prefix, write_property, write_records
from .jpeg import encode_jpeg, image_size
from .pool import mapper


def load_image(path: str, *, resize: bool, quality: int) -> tuple[bytes, tuple[int, int]]:
    """(bytes, (height, width)) of the file, or of a 112x112 RGB JPEG re-encoding when ``resize``.

    The size comes from the header only; a file Pillow cannot identify is refused here, naming
    it, rather than packed for the loader to fail on mid-run.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        if not resize:
            width, height = image_size(data)
            return data, (height, width)
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            return encode_jpeg(np.asarray(rgb), quality=quality), (IMAGE_SIZE, IMAGE_SIZE)
    except Exception as exc:  # Pillow raises many types for bad files
        action = "re-encode" if resize else "read the image size"
        raise ValueError(f"{path}: cannot {action}: {exc}") from exc


def pack(
    src: str,
    out_prefix: str,
    *,
    resize: bool = False,
    quality: int = 95,
    seed: int = 0,
    shuffle: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[int, Counter[tuple[int, int]]]:
    """Pack ``src`` into ``out_prefix``; return (images written, image count per (height, width))."""
    scan = scan_folder(src)
    if scan.num_images == 0:
        raise ValueError(f"{src}: the identity folders hold no images")
    n = scan.num_images
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    ranges = None
    if not shuffle:  # files are grouped by label already; keys start at 1
        ends = np.cumsum(np.bincount(scan.labels, minlength=len(scan.class_names)))
        ranges = [
            (1 + int(e - c), 1 + int(e))
            for e, c in zip(ends, np.diff(ends, prepend=0), strict=True)
        ]
    paths = [scan.path(int(i)) for i in order]
    load = partial(load_image, resize=resize, quality=quality)
    workers = workers or min(os.cpu_count() or 1, 16)
    sizes: Counter[tuple[int, int]] = Counter()

    def labelled(loaded: Iterator[tuple[bytes, tuple[int, int]]]) -> Iterator[tuple[int, bytes]]:
        for i, (jpeg, size) in zip(order, loaded, strict=True):
            sizes[size] += 1
            yield int(scan.labels[i]), jpeg

    with mapper(workers) as pmap:
        items = labelled(pmap(load, paths, chunksize=64))
        items = tqdm(items, total=n, desc="pack", unit="img", disable=not progress)
        write_records(
            out_prefix,
            items,
            num_images=n,
            num_classes=len(scan.class_names),
            identity_ranges=ranges,
        )
    prefix = split_prefix(out_prefix)
    write_property(prefix, len(scan.class_names), next(iter(sizes)) if len(sizes) == 1 else None)
    save_label_map(scan, prefix + ".labels.json")
    return n, sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipelines.pack", description=__doc__.splitlines()[0]
    )
    ap.add_argument("src_dir", help="folder of identity folders: SRC_DIR/<identity>/<image>")
    ap.add_argument(
        "out_prefix", help="writes OUT_PREFIX.rec, .idx, .labels.json and a property file"
    )
    ap.add_argument("--resize", action="store_true", help="re-encode every image as 112x112 JPEG")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality with --resize")
    ap.add_argument("--seed", type=int, default=0, help="seed of the image order shuffle")
    ap.add_argument("--sorted", action="store_true", help="keep images grouped by identity")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        n, sizes = pack(
            a.src_dir,
            a.out_prefix,
            resize=a.resize,
            quality=a.quality,
            seed=a.seed,
            shuffle=not a.sorted,
            workers=a.workers,
            progress=True,
        )
    except (OSError, ValueError) as exc:  # a bad source folder or image: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"packed {n} images into {split_prefix(a.out_prefix)}.rec")
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h} ({k})" for (h, w), k in sizes.most_common(3))
        more = ", ..." if len(sizes) > 3 else ""
        print(
            f"WARNING images differ in size ({len(sizes)} sizes: {shown}{more}); "
            "property says mixed: train with data.resize: true or pack again with --resize"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
