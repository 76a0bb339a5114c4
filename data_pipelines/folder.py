"""A folder of identity folders: labels are the ranks of the sorted folder names.

Sorting makes the label of a folder the same on every rank and every run without shared state;
the mapping is still written out so a checkpoint's class ids can be traced back to identities.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class FolderScan:
    root: str
    files: list[str]  # paths relative to root, grouped by identity
    labels: np.ndarray  # int64, one per file
    class_names: list[str]  # label -> folder name

    @property
    def num_images(self) -> int:
        return len(self.files)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])


def scan_folder(root: str | os.PathLike) -> FolderScan:
    """List ``root/<identity>/<image>``; identities sorted by name, images sorted within."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a directory of identity folders")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not class_names:
        raise ValueError(f"{root} holds no identity folders (expected root/<identity>/<image>)")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        images = sorted(
            e.name
            for e in os.scandir(os.path.join(root, name))
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        files.extend(f"{name}/{img}" for img in images)
        labels.extend([label] * len(images))
    return FolderScan(root, files, np.asarray(labels, dtype=np.int64), class_names)


def save_label_map(scan: FolderScan, path: str | os.PathLike) -> Path:
    """Write ``{"root": ..., "classes": [folder name by label]}`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"root": os.path.abspath(scan.root), "classes": scan.class_names}))
    os.replace(tmp, path)
    return path
