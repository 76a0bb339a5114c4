"""``DataConfig``: the ``data:`` section of the trainer YAML, validated on construction.

A typo in a data key silently falling back to a default costs a multi-day run, so unknown keys
and out-of-range values raise ``ValueError`` naming the key and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .insightface import IMAGE_SIZE

SOURCES = ("rec", "folder")
READERS = ("external", "native")
DECODERS = ("dali", "nvimgcodec")
LAST_BATCH = ("drop", "pad")
# insightface arcface_torch ``dali_aug`` probabilities (recognition/arcface_torch/dataset.py).
INSIGHTFACE_AUG = {"downscale": 0.1, "blur": 0.2, "hsv": 0.1, "gray": 0.1}


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "data_pipelines")


@dataclass
class DataConfig:
    """Data loading settings; see the README's ``data:`` table for each key's meaning.

    ``resize``: DALI resizes every decoded image to ``image_size`` (always the case when
    ``image_size`` is not 112). Without it images are centre-cropped to 112, which only fits
    aligned 112x112 faces: a data set whose ``property`` says another size or ``mixed`` is
    refused at start-up, and a batch of mismatched sizes raises ``DataError``, both asking for
    ``data.resize: true``.

    ``decoder``: ``dali`` (the default) decodes and augments in a DALI graph; ``nvimgcodec``
    decodes with NVIDIA nvImageCodec (on the GPU where the loader's device is CUDA) and augments
    with torch ops, for machines without a matching DALI build. Same samples, parameters and
    state either way; only the ``external`` reader, since ``native`` is DALI's own reader.
    """

    source: str = "rec"  # rec | folder
    path: str | None = None  # .rec prefix (or x.rec) / folder of identity folders
    num_classes: int | None = None  # None: from `property`, the header, or folder count
    reader: str = "external"  # external: exact global shuffle; native: fn.readers.*
    decoder: str = "dali"  # dali: DALI graph (`mixed` on a GPU); nvimgcodec: without DALI
    last_batch: str = "drop"  # drop | pad (pad repeats real samples, see Loader.valid)
    shuffle: bool = True
    shuffle_buffer: int | None = None  # native only: DALI initial_fill (default 16384)
    stick_to_shard: bool | None = None  # native only: keep one shard forever (default False)
    skip_corrupt: bool = False  # drop badly framed / non-integer-label records, counted
    dali_aug: bool | dict[str, float] = False  # True = insightface probabilities
    mirror: float = 0.5  # horizontal flip probability
    resize: bool = False  # resize decoded images to image_size (images not all 112x112)
    image_size: int = 112  # output side; not 112: decoded images are resized to it
    num_threads: int = 4  # decoder CPU threads per rank (DALI's, or nvImageCodec's)
    prefetch: int = 2  # batches decoded ahead (DALI's queue, or the nvimgcodec thread's)
    cache_dir: str | None = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        _one_of("source", self.source, SOURCES)
        _one_of("reader", self.reader, READERS)
        _one_of("decoder", self.decoder, DECODERS)
        _one_of("last_batch", self.last_batch, LAST_BATCH)
        for name in ("shuffle", "skip_corrupt", "resize"):
            _bool(name, getattr(self, name))
        for name in ("num_threads", "prefetch", "image_size"):
            _positive(name, getattr(self, name))
        for name in ("num_classes", "shuffle_buffer"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.stick_to_shard is not None:
            _bool("stick_to_shard", self.stick_to_shard)
        _probability("mirror", self.mirror)
        self.dali_aug = _aug(self.dali_aug)
        if not self.path:
            raise ValueError(f"data.path is required for data.source {self.source!r}")
        if self.decoder == "nvimgcodec" and self.reader != "external":
            raise ValueError(
                "data.decoder 'nvimgcodec' needs data.reader 'external' "
                "(the 'native' reader is DALI's own C++ reader)"
            )
        if self.reader != "native":
            for name in ("shuffle_buffer", "stick_to_shard"):
                if getattr(self, name) is not None:
                    raise ValueError(f"data.{name} applies only to data.reader 'native'")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DataConfig:
        """Build from the YAML ``data:`` mapping; unknown keys raise ``ValueError``."""
        d = dict(d or {})
        if "source" in d:  # first: a wrong source explains its keys being unknown
            _one_of("source", d["source"], SOURCES)
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"data: unknown key(s) {unknown}; allowed keys: {allowed}")
        return cls(**d)

    @property
    def resizes(self) -> bool:
        """Whether DALI resizes decoded images (asked for, or implied by ``image_size``)."""
        return self.resize or self.image_size != IMAGE_SIZE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"data.{name}: {value!r} must be true or false")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"data.{name}: {value!r} must be a positive integer")


def _probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"data.{name}: {value!r} must be a probability in [0, 1]")


def _aug(value: Any) -> dict[str, float]:
    """Normalise ``dali_aug`` to the four insightface probabilities."""
    if isinstance(value, bool):
        return dict(INSIGHTFACE_AUG) if value else dict.fromkeys(INSIGHTFACE_AUG, 0.0)
    if not isinstance(value, dict):
        raise ValueError(
            f"data.dali_aug: {value!r} must be true, false or a mapping with keys {list(INSIGHTFACE_AUG)}"
        )
    unknown = sorted(set(value) - set(INSIGHTFACE_AUG))
    if unknown:
        raise ValueError(
            f"data.dali_aug: unknown key(s) {unknown}; allowed keys: {list(INSIGHTFACE_AUG)}"
        )
    out = dict.fromkeys(INSIGHTFACE_AUG, 0.0)
    for key, p in value.items():
        _probability(f"dali_aug.{key}", p)
        out[key] = float(p)
    return out
