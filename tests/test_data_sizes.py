"""Images that are not all 112x112: ``pack`` records the truth in ``property``, and the loader
asks for ``data.resize: true`` instead of cropping or failing obscurely mid-run."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import DataConfig, DataError, build_loader, pack
from data_pipelines.insightface import Property, read_property
from data_pipelines.jpeg import encode_jpeg
from tests.test_data_helpers import decode_ids, image_jpeg

READERS = ["external", "native"]


def sized_jpeg(i: int, width: int, height: int) -> bytes:
    """``image_jpeg(i)``'s flat colour at another size (``decode_ids`` still reads it)."""
    with Image.open(BytesIO(image_jpeg(i))) as im:
        return encode_jpeg(np.asarray(im.convert("RGB").resize((width, height))))


def make_sized_folder(root: Path, sizes: list[tuple[int, int]], per_id: int = 2) -> np.ndarray:
    """root/id_XXX/img_YYY.jpg with image i of (width, height) ``sizes[i]``; labels by id."""
    labels = np.arange(len(sizes)) // per_id
    for i, (w, h) in enumerate(sizes):
        d = root / f"id_{labels[i]:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:04d}.jpg").write_bytes(sized_jpeg(i, w, h))
    return labels


MIXED = [(112, 112)] * 5 + [(64, 80)] + [(112, 112)] * 5 + [(150, 150)]  # (width, height)


@pytest.mark.parametrize(
    ("sizes", "resize", "text", "prop"),
    [
        ([(112, 112)] * 4, False, "2,112,112\n", Property(2, (112, 112))),
        ([(64, 80)] * 4, False, "2,80,64\n", Property(2, (80, 64))),  # height, width
        (MIXED, False, "6,mixed\n", Property(6, None, mixed=True)),
        (MIXED, True, "6,112,112\n", Property(6, (112, 112))),
    ],
)
def test_pack_records_the_shared_size_or_mixed(
    tmp_path: Path, sizes: list, resize: bool, text: str, prop: Property
) -> None:
    make_sized_folder(tmp_path / "src", sizes)
    n, seen = pack.pack(str(tmp_path / "src"), str(tmp_path / "out"), workers=1, resize=resize)
    assert n == len(sizes)
    assert dict(seen) == (
        {(112, 112): len(sizes)} if resize else {(h, w): sizes.count((w, h)) for w, h in sizes}
    )
    assert (tmp_path / "property").read_text() == text
    assert read_property(str(tmp_path / "out")) == prop


def test_pack_command_warns_about_mixed_sizes(tmp_path: Path, capsys) -> None:
    make_sized_folder(tmp_path / "src", MIXED)
    assert pack.main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"packed 12 images into {tmp_path / 'out'}.rec",
        "WARNING images differ in size (3 sizes: 112x112 (10), 64x80 (1), 150x150 (1)); "
        "property says mixed: train with data.resize: true or pack again with --resize",
    ]


def test_pack_command_names_an_unreadable_image(tmp_path: Path, capsys) -> None:
    make_sized_folder(tmp_path / "src", [(112, 112)] * 2)
    bad = tmp_path / "src" / "id_000" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    assert pack.main([str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: {bad}: cannot read the image size: ")


@pytest.mark.parametrize(
    ("text", "prop"),
    [
        ("93431,112,112\n", Property(93431, (112, 112))),
        ("7,mixed", Property(7, None, mixed=True)),
        ("7", Property(7)),  # no size recorded: nothing is claimed or refused
    ],
)
def test_read_property_formats(tmp_path: Path, text: str, prop: Property) -> None:
    (tmp_path / "property").write_text(text)
    assert read_property(str(tmp_path / "train")) == prop


def test_malformed_property_is_named(tmp_path: Path) -> None:
    (tmp_path / "property").write_text("7,112\n")
    with pytest.raises(ValueError, match=r"property: expected 'num_classes,height,width' or"):
        read_property(str(tmp_path / "train"))


def _cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), num_threads=1, **kw)


@pytest.mark.parametrize("reader", READERS)
def test_mixed_pack_is_refused_without_resize_and_loads_with_it(
    tmp_path: Path, reader: str
) -> None:
    truth = make_sized_folder(tmp_path / "src", MIXED)
    pack.pack(str(tmp_path / "src"), str(tmp_path / "out" / "train"), workers=1)
    prefix = tmp_path / "out" / "train"
    with pytest.raises(DataError) as err:
        build_loader(
            _cfg(prefix, tmp_path, reader=reader), batch_size=4, rank=0, world_size=1, device="cpu"
        )
    assert str(err.value) == (
        f"{prefix}.rec: its property file says the images differ in size; "
        "set data.resize: true to resize them to 112x112"
    )
    cfg = _cfg(prefix, tmp_path, reader=reader, resize=True, last_batch="pad", shuffle=False)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu")
    seen = []
    for images, labels in loader:
        assert images.shape == (4, 3, 112, 112) and images.dtype == torch.float32
        ids = decode_ids(images)
        assert (labels.numpy() == truth[ids]).all()
        seen.extend(ids[: loader.valid].tolist())
    assert sorted(seen) == list(range(12))


def test_a_uniform_size_other_than_112_is_refused_without_resize(tmp_path: Path) -> None:
    make_sized_folder(tmp_path / "src", [(64, 80)] * 4)
    pack.pack(str(tmp_path / "src"), str(tmp_path / "train"), workers=1)
    with pytest.raises(DataError) as err:
        build_loader(
            _cfg(tmp_path / "train", tmp_path), batch_size=2, rank=0, world_size=1, device="cpu"
        )
    assert str(err.value) == (
        f"{tmp_path / 'train'}.rec: its property file says the images are 64x80, not 112x112; "
        "set data.resize: true to resize them"
    )
    for kw in ({"resize": True}, {"image_size": 56}):  # image_size != 112 resizes as well
        cfg = _cfg(tmp_path / "train", tmp_path, **kw)
        images, _ = next(iter(build_loader(cfg, batch_size=2, rank=0, world_size=1, device="cpu")))
        assert images.shape[2:] == (cfg.image_size, cfg.image_size)


@pytest.mark.parametrize("reader", READERS)
def test_a_batch_of_mismatched_sizes_names_the_path_and_resize(tmp_path: Path, reader: str) -> None:
    """No property to warn (a folder source): the batch DALI cannot assemble is explained."""
    make_sized_folder(tmp_path / "faces", MIXED)
    cfg = _cfg(tmp_path / "faces", tmp_path, source="folder", reader=reader, shuffle=False)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu")
    with pytest.raises(DataError) as err:
        list(loader)
    if reader == "external":  # our sampler knows the samples: the file is named
        example = f"file {tmp_path / 'faces' / 'id_002' / 'img_0005.jpg'} is 64x80"
    else:  # DALI's reader chose them: only the size is known
        example = "an image is 64x80"
    assert str(err.value) == (
        f"{tmp_path / 'faces'}: images of mismatched sizes at epoch 0 step 1 ({example}, "
        "expected 112x112); set data.resize: true to resize them"
    )
    cfg = _cfg(tmp_path / "faces", tmp_path, source="folder", reader=reader, resize=True)
    batches = list(build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu"))
    assert len(batches) == 3 and all(x.shape == (4, 3, 112, 112) for x, _ in batches)
