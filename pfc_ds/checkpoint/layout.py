"""Where checkpoints are on disk, and the one way from a user's path to one: ``open_checkpoint``.

Layout of ``OUTPUT/checkpoints``::

    latest                          tag of the newest *complete* checkpoint (written last)
    step00001234/                   one tag folder per checkpoint
        mp_rank_00_model_states.pt  ... DeepSpeed's files (engine.save_checkpoint)
        head_shard_00000_of_00002.pt    sampler RNG, sharding meta; rows in ``.pt.weight.bin`` ...
        trainer_state_00000.pt          step, epoch, data position, RNG, LR factor, per rank
        meta.json                       world size, ZeRO stage, precision, and every file of the
                                        tag with its size and checksum (written last)
    step00001234.damaged/           a tag that failed verification on load (kept for a look)
    universal/step00001234/         DeepSpeed universal checkpoint, made when resuming at a
                                    different world size under ZeRO 1-3

A tag without ``meta.json`` (a save cut short by a kill, a crash or a full disk) is never read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfc_ds.checkpoint import integrity
from pfc_ds.checkpoint.shard_files import SHARD_RE, find_shards

log = logging.getLogger("pfc_ds.checkpoint")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
DAMAGED = ".damaged"
UNIVERSAL = "universal"
FORMAT = 2  # meta.json lists every file with its size and checksum
TAG_RE = re.compile(r"step(\d{8,})")


class CheckpointError(Exception):
    """A checkpoint could not be written (the previous ones are intact) or none can be read.

    The fields say what was wrong where a caller (or a test) needs more than the message:
    ``path`` (the folder concerned), ``free``/``need`` (bytes, when space ran short) and
    ``rank`` (the rank that saw it).
    """

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        free: int | None = None,
        need: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path, self.free, self.need, self.rank = path, free, need, rank


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of a tag folder's name, or ``None`` for anything else."""
    m = TAG_RE.fullmatch(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint: its tag folder and the ``meta.json`` written as its commit
    point (the keys are the trainer's; ``step``, ``world_size`` and ``zero_stage`` always)."""

    folder: Path
    meta: dict[str, Any] = field(compare=False, repr=False)

    @property
    def tag(self) -> str:
        return self.folder.name

    @property
    def root(self) -> Path:
        """The ``checkpoints`` folder holding it."""
        return self.folder.parent

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self.meta["zero_stage"])

    @property
    def bytes(self) -> int:
        return int(self.meta.get("bytes") or 0)

    def head_shards(self) -> list[Path]:
        return find_shards(self.folder)

    def trainer_state_path(self, rank: int) -> Path:
        return self.folder / f"trainer_state_{rank:05d}.pt"

    @property
    def universal(self) -> Path:
        """Where DeepSpeed's universal conversion of this tag goes."""
        return self.root / UNIVERSAL / self.tag


def read_ref(folder: Path) -> CheckpointRef:
    """The checkpoint of tag folder ``folder`` (``CheckpointError`` if it has no readable
    ``meta.json``: a save cut short, or not a checkpoint)."""
    path = folder / META
    if not path.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {META}: a save cut short)",
                              path=folder)  # fmt: skip
    try:
        return CheckpointRef(folder, json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc})", path=folder) from exc


def tags(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every tag folder under ``root``, complete or not, newest first."""
    if not root.is_dir():
        return []
    out = [(s, p) for p in root.iterdir() if (s := tag_step(p.name)) is not None]
    return sorted(out, reverse=True)


def checkpoints_root(output: str | os.PathLike) -> Path:
    return Path(output) / CHECKPOINTS


def candidates(output: str | os.PathLike) -> list[CheckpointRef]:
    """Every complete checkpoint of a training output, newest first.

    Complete means a readable ``meta.json`` (written only once every rank's files were), not
    necessarily intact: ``reader.verify`` reads the files.
    """
    out = []
    for _, folder in tags(checkpoints_root(output)):
        if not (folder / META).is_file():
            continue
        try:
            out.append(read_ref(folder))
        except CheckpointError as exc:
            log.warning("%s; skipping %s", exc, folder.name)
    return out


def incomplete(output: str | os.PathLike) -> list[Path]:
    """Tag folders without ``meta.json``: saves that were cut short."""
    return [p for _, p in tags(checkpoints_root(output)) if not (p / META).is_file()]


def open_checkpoint(path: str | os.PathLike) -> CheckpointRef:
    """The checkpoint a user means by ``path``: a tag folder, a training output folder or its
    ``checkpoints`` folder (then the newest complete tag). Raises ``FileNotFoundError`` naming
    the path when there is none: the one resolver of the trainer, eval, export, embed and tools.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    is_tag = tag_step(path.name) is not None or any(path.glob("trainer_state_*.pt"))
    if (path / META).is_file() or is_tag:
        try:
            return read_ref(path)
        except CheckpointError as exc:
            raise FileNotFoundError(str(exc)) from exc
    output = path.parent if path.name == CHECKPOINTS else path
    found = candidates(output)
    if not found:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (no {META})")
    return found[0]


def head_shard_paths(path: str | os.PathLike) -> list[Path]:
    """Head shard files of a checkpoint (anything ``open_checkpoint`` takes), or of a folder of
    bare shards (``python -m pfc_ds.tools.reshard``'s output), in rank order."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    names = [p.name for p in path.iterdir()]
    if any(SHARD_RE.match(n) for n in names) and not any(
        n.startswith("trainer_state_") for n in names
    ):
        return find_shards(path)  # bare shards
    return open_checkpoint(path).head_shards()


def set_aside(folder: Path) -> Path:
    """Rename a damaged tag out of the way (rank 0), so no resume or save reads it again."""
    target = folder.with_name(folder.name + DAMAGED)
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}{DAMAGED}{n}")
    os.replace(folder, target)
    integrity.fsync_dir(folder.parent)
    return target


def prune(root: Path, keep_last: int, keep: set[str]) -> None:
    """Keep the newest ``keep_last`` complete tags, ``keep``, and the tag ``latest`` names;
    remove older complete tags and every incomplete one (a save cut short)."""
    if keep_last <= 0:
        return
    latest = root / LATEST
    if latest.is_file():
        keep = keep | {latest.read_text().strip()}
    complete = [p for _, p in tags(root) if (p / META).is_file()]
    keep |= {p.name for p in complete[:keep_last]}
    for _, folder in tags(root):
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(root / UNIVERSAL / folder.name, ignore_errors=True)
