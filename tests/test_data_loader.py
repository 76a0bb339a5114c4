"""build_loader end to end on the CPU: coverage, sharding, labels, corruption, resume."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines import DataConfig, DataError, build_loader
from data_pipelines.dali import decoder_device, gpu_count
from data_pipelines.recordio import read_index
from tests.test_data_helpers import decode_ids, make_folder, make_im2rec, make_insightface

READERS = ["external", "native"]


def _cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), num_threads=1, **kw)


def _epoch(loader) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """(sample ids, labels, valid) per batch of one epoch, checking the output contract."""
    ids, labels, valid = [], [], []
    for images, lab in loader:
        assert images.shape == (loader.batch_size, 3, 112, 112) and images.dtype == torch.float32
        assert lab.shape == (loader.batch_size,) and lab.dtype == torch.int64
        assert images.device.type == lab.device.type == "cpu"
        assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
        ids.append(decode_ids(images))
        labels.append(lab.numpy())
        valid.append(loader.valid)
    return ids, labels, valid


def _new(ids: list[np.ndarray], valid: list[int]) -> np.ndarray:
    return np.concatenate([b[:v] for b, v in zip(ids, valid, strict=True)])


@pytest.mark.parametrize("reader", READERS)
def test_insightface_layout_every_image_once_with_its_label(tmp_path: Path, reader: str) -> None:
    truth = make_insightface(tmp_path / "train", 45, per_id=4)  # header + 45 images + 12 ids
    cfg = _cfg(tmp_path / "train", tmp_path, reader=reader, last_batch="pad", shuffle=False)
    loader = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu")
    assert (loader.num_images, loader.num_classes, len(loader)) == (45, 12, 6)
    ids, labels, valid = _epoch(loader)
    assert valid == [8, 8, 8, 8, 8, 5]
    assert sorted(_new(ids, valid).tolist()) == list(range(45))
    for b, lab in zip(ids, labels, strict=True):  # padded samples keep their true labels too
        assert (lab == truth[b]).all()


@pytest.mark.parametrize("vector_labels", [False, True])
def test_im2rec_layout_without_header(tmp_path: Path, vector_labels: bool) -> None:
    truth = make_im2rec(tmp_path / "train", 24, per_id=3, vector_labels=vector_labels)
    loader = build_loader(
        _cfg(tmp_path / "train", tmp_path), batch_size=8, rank=0, world_size=1, device="cpu"
    )
    assert (loader.num_images, loader.num_classes) == (24, 8)  # no header/property: max + 1
    ids, labels, _ = _epoch(loader)
    assert sorted(np.concatenate(ids).tolist()) == list(range(24))
    assert all((lab == truth[b]).all() for b, lab in zip(ids, labels, strict=True))


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_cover_and_have_equal_steps(
    tmp_path: Path, reader: str, world_size: int
) -> None:
    truth = make_insightface(tmp_path / "train", 50, per_id=5, shuffle=True)
    for last_batch in ("pad", "drop"):
        cfg = _cfg(
            tmp_path / "train",
            tmp_path,
            reader=reader,
            last_batch=last_batch,
            shuffle=reader == "external",
        )
        loaders = [
            build_loader(cfg, batch_size=4, rank=r, world_size=world_size, device="cpu")
            for r in range(world_size)
        ]
        assert len({len(x) for x in loaders}) == 1
        per_rank = []
        for loader in loaders:
            ids, labels, valid = _epoch(loader)
            assert len(ids) == len(loader)
            assert all((lab == truth[b]).all() for b, lab in zip(ids, labels, strict=True))
            per_rank.append(_new(ids, valid))
        seen = np.concatenate(per_rank)
        assert len(set(seen.tolist())) == seen.size  # disjoint
        if last_batch == "pad":
            assert sorted(seen.tolist()) == list(range(50))  # covering
        else:
            assert all(len(x) == len(loaders[0]) * 4 for x in per_rank)


def test_epochs_reshuffle_with_a_seed_shared_by_ranks(tmp_path: Path) -> None:
    make_insightface(tmp_path / "train", 32, per_id=4)
    cfg = _cfg(tmp_path / "train", tmp_path)
    a = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu", seed=5)
    e0 = np.concatenate(_epoch(a)[0])
    e1 = np.concatenate(_epoch(a)[0])  # iterating again starts epoch 1
    assert a.epoch == 1 and sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(32))
    assert e0.tolist() != e1.tolist() and e0.tolist() != list(range(32))
    b = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu", seed=5)
    assert np.concatenate(_epoch(b)[0]).tolist() == e0.tolist()


@pytest.mark.parametrize("reader", READERS)
def test_resume_mid_epoch_at_the_same_sample(tmp_path: Path, reader: str) -> None:
    make_insightface(tmp_path / "train", 64, per_id=4, shuffle=True)
    cfg = _cfg(tmp_path / "train", tmp_path, reader=reader, dali_aug=True, mirror=0.5)
    first = build_loader(cfg, batch_size=4, rank=1, world_size=2, device="cpu", seed=11)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3 * 8)
    want = [next(it) for _ in range(2)]
    second = build_loader(cfg, batch_size=4, rank=1, world_size=2, device="cpu", seed=11)
    second.load_state_dict(state)
    got = [next(iter(second)) for _ in range(2)]
    for (wi, wl), (gi, gl) in zip(want, got, strict=True):
        assert torch.equal(wl, gl) and torch.equal(wi, gi)  # augmentations replay exactly
    rest = sum(1 for _ in second)
    assert rest == len(first) - 5 and second.epoch == 0


def test_resume_state_is_checked(tmp_path: Path) -> None:
    make_insightface(tmp_path / "train", 32, per_id=4)
    loader = build_loader(
        _cfg(tmp_path / "train", tmp_path), batch_size=4, rank=0, world_size=1, device="cpu"
    )
    state = loader.state_dict()
    other = build_loader(
        _cfg(tmp_path / "train", tmp_path), batch_size=4, rank=0, world_size=1, device="cpu", seed=1
    )
    with pytest.raises(ValueError, match="loader state has seed=0 but this loader has 1"):
        other.load_state_dict(state)
    native = build_loader(
        _cfg(tmp_path / "train", tmp_path, reader="native"),
        batch_size=4,
        rank=0,
        world_size=1,
        device="cpu",
    )
    with pytest.raises(
        ValueError, match="native reader resume needs the same world_size: saved 2, now 1"
    ):
        native.load_state_dict({**native.state_dict(), "world_size": 2})


def _corrupt(prefix: Path, key: int, how: str) -> int:
    keys, offsets = read_index(f"{prefix}.idx")
    off = int(offsets[keys.tolist().index(key)])
    rec = Path(f"{prefix}.rec")
    if how == "truncate":
        rec.write_bytes(rec.read_bytes()[: off + 50])
    else:
        with open(rec, "r+b") as f:
            f.seek(off + 1)
            f.write(b"\x99")
    return off


@pytest.mark.parametrize("how", ["magic", "truncate"])
def test_corrupt_record_is_refused_or_skipped_and_counted(tmp_path: Path, how: str) -> None:
    prefix = tmp_path / "train"
    make_im2rec(prefix, 30, per_id=3)
    bad_key = 29 if how == "truncate" else 11
    off = _corrupt(prefix, bad_key, how)
    kind = "truncated" if how == "truncate" else "bad_magic"
    with pytest.raises(
        DataError, match=rf"1 bad record\(s\):\n  {kind}: key={bad_key} offset={off}"
    ):
        build_loader(_cfg(prefix, tmp_path), batch_size=4, rank=0, world_size=1, device="cpu")
    for reader in READERS:
        cfg = _cfg(
            prefix, tmp_path, skip_corrupt=True, last_batch="pad", reader=reader, shuffle=False
        )
        loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu")
        assert (loader.skipped, loader.num_images) == (1, 29)
        ids, _, valid = _epoch(loader)
        assert sorted(_new(ids, valid).tolist()) == sorted(set(range(30)) - {bad_key})


@pytest.mark.parametrize("source", ["rec", "folder"])
def test_label_beyond_num_classes_is_refused_before_training(tmp_path: Path, source: str) -> None:
    if source == "rec":
        make_insightface(tmp_path / "train", 20, per_id=4)  # labels 0..4, property says 5
        path, where = tmp_path / "train", r"key=17 offset=\d+"
    else:
        make_folder(tmp_path / "train", 20, per_id=4)
        path, where = tmp_path / "train", "key=id_004/img_0016.jpg"
    cfg = _cfg(path, tmp_path, num_classes=4, source=source)
    with pytest.raises(DataError, match=rf"label_range: {where}: label 4 >= num_classes 4"):
        build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu")


def test_non_integer_label_is_refused(tmp_path: Path) -> None:
    make_im2rec(tmp_path / "train", 12, per_id=3)
    _, offsets = read_index(tmp_path / "train.idx")
    with open(tmp_path / "train.rec", "r+b") as f:
        f.seek(int(offsets[5]) + 8 + 4)
        f.write(struct.pack("<f", 1.5))
    with pytest.raises(
        DataError, match=rf"bad_label: key=5 offset={int(offsets[5])}: label 1.5 is not an integer"
    ):
        build_loader(
            _cfg(tmp_path / "train", tmp_path), batch_size=4, rank=0, world_size=1, device="cpu"
        )


def test_undecodable_jpeg_is_named_when_the_loader_hits_it(tmp_path: Path) -> None:
    make_im2rec(tmp_path / "train", 8, per_id=2)
    _, offsets = read_index(tmp_path / "train.idx")
    with open(tmp_path / "train.rec", "r+b") as f:
        f.seek(int(offsets[6]) + 8 + 24)
        f.write(b"\0" * 32)
    loader = build_loader(
        _cfg(tmp_path / "train", tmp_path), batch_size=8, rank=0, world_size=1, device="cpu"
    )
    with pytest.raises(
        DataError, match=rf"record key=6 offset={int(offsets[6])}: not an image Pillow"
    ):
        next(iter(loader))


@pytest.mark.parametrize("reader", READERS)
def test_folder_source_labels_from_sorted_names_and_saved_map(tmp_path: Path, reader: str) -> None:
    truth = make_folder(tmp_path / "faces", 18, per_id=3)
    cfg = _cfg(tmp_path / "faces", tmp_path, source="folder", reader=reader, last_batch="pad")
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu")
    assert (loader.num_images, loader.num_classes, len(loader)) == (18, 6, 5)
    ids, labels, valid = _epoch(loader)
    assert sorted(_new(ids, valid).tolist()) == list(range(18))
    assert all((lab == truth[b]).all() for b, lab in zip(ids, labels, strict=True))
    classes = json.loads(Path(loader.label_map_path).read_text())["classes"]
    assert classes == [f"id_{c:03d}" for c in range(6)]


def test_dali_aug_changes_pixels_not_labels(tmp_path: Path) -> None:
    make_im2rec(tmp_path / "train", 16, per_id=4)
    plain = build_loader(
        _cfg(tmp_path / "train", tmp_path, shuffle=False, mirror=0.0),
        batch_size=16,
        rank=0,
        world_size=1,
        device="cpu",
    )
    probs = {"downscale": 1.0, "blur": 1.0, "hsv": 1.0, "gray": 1.0}
    aug = build_loader(
        _cfg(tmp_path / "train", tmp_path, shuffle=False, dali_aug=probs),
        batch_size=16,
        rank=0,
        world_size=1,
        device="cpu",
    )
    (x0, y0), (x1, y1) = next(iter(plain)), next(iter(aug))
    assert torch.equal(y0, y1)
    spread = x1.std(dim=1).mean()  # gray = 1.0: channels collapse to one value per pixel
    assert float(spread) < 0.02 < float(x0.std(dim=1).mean())


def test_decoder_is_mixed_on_gpu_and_cuda_is_refused_without_one(tmp_path: Path) -> None:
    assert decoder_device(True) == "mixed" and decoder_device(False) == "cpu"
    if gpu_count() > 0:
        pytest.skip("a GPU is present: see test_gpu_loader")
    make_im2rec(tmp_path / "train", 8, per_id=4)
    cfg = _cfg(tmp_path / "train", tmp_path)
    with pytest.raises(ValueError, match="DALI sees no CUDA device"):
        build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="no CUDA device visible to DALI")
def test_gpu_loader(tmp_path: Path) -> None:
    truth = make_insightface(tmp_path / "train", 32, per_id=4)
    loader = build_loader(
        _cfg(tmp_path / "train", tmp_path), batch_size=8, rank=0, world_size=1, device="cuda:0"
    )
    for images, labels in loader:
        assert images.device.type == labels.device.type == "cuda"
        assert images.dtype == torch.float16 and labels.dtype == torch.int64
        assert (labels.cpu().numpy() == truth[decode_ids(images)]).all()


@pytest.mark.parametrize("reader", READERS)
def test_image_size_other_than_112_resizes_after_decode(tmp_path: Path, reader: str) -> None:
    truth = make_im2rec(tmp_path / "train", 16, per_id=4)
    cfg = DataConfig.from_dict(
        {
            "source": "rec",
            "num_classes": 4,
            "image_size": 56,
            "path": str(tmp_path / "train"),
            "reader": reader,
            "num_threads": 1,
            "cache_dir": str(tmp_path / "cache"),
            "dali_aug": {"downscale": 1.0, "blur": 1.0},
        }
    )
    images, labels = next(iter(build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu")))
    assert images.shape == (8, 3, 56, 56) and images.dtype == torch.float32
    assert (labels.numpy() == truth[decode_ids(images)]).all()
    plain = _cfg(tmp_path / "train", tmp_path, reader=reader, image_size=56)  # no augmentation
    images, labels = next(
        iter(build_loader(plain, batch_size=8, rank=0, world_size=1, device="cpu"))
    )
    assert images.shape == (8, 3, 56, 56)
    assert (labels.numpy() == truth[decode_ids(images)]).all()


@pytest.mark.parametrize("source", ["rec", "folder"])
def test_num_classes_above_the_data_sets_count_warns_naming_both(
    tmp_path: Path, source: str, caplog: pytest.LogCaptureFixture
) -> None:
    maker = make_insightface if source == "rec" else make_folder
    maker(tmp_path / "train", 20, per_id=4)  # 5 identities
    cfg = _cfg(tmp_path / "train", tmp_path, num_classes=8, source=source)
    with caplog.at_level("WARNING"):
        loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, device="cpu")
    assert loader.num_classes == 8
    assert "data.num_classes=8 but the data set has 5 identities" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_loader(
            _cfg(tmp_path / "train", tmp_path, num_classes=5, source=source),
            batch_size=4,
            rank=0,
            world_size=1,
            device="cpu",
        )
    assert "num_classes" not in caplog.text


def test_external_reader_reads_off_the_training_thread_with_one_pipeline(
    tmp_path: Path, monkeypatch
) -> None:
    """The JPEG bytes are read by the feeder thread, and one DALI pipeline serves every epoch
    (the stream runs on into the next); a resume mid-epoch rebuilds it at the saved position."""
    import threading

    from data_pipelines import external, sources

    make_insightface(tmp_path / "train", 40, per_id=4, shuffle=True)
    cfg = _cfg(tmp_path / "train", tmp_path, last_batch="pad")
    readers: set[str] = set()
    read = sources.RecDataset.read

    def spy(self, i):
        readers.add(threading.current_thread().name)
        return read(self, i)

    builds = []
    start = external.start_pipeline
    monkeypatch.setattr(sources.RecDataset, "read", spy)
    monkeypatch.setattr(
        external, "start_pipeline", lambda *a, **k: builds.append(1) or start(*a, **k)
    )
    loader = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu")
    epochs = [_epoch(loader) for _ in range(3)]
    assert len(builds) == 1 and readers == {"pfc-feeder"}
    fresh = [_epoch(build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu"))]
    assert [b.tolist() for b in epochs[0][0]] == [b.tolist() for b in fresh[0][0]]
    assert [b.tolist() for b in epochs[1][0]] != [b.tolist() for b in epochs[0][0]]  # reshuffled

    it = iter(loader)
    next(it)
    state = loader.state_dict()
    after = decode_ids(next(it)[0])
    resumed = build_loader(cfg, batch_size=8, rank=0, world_size=1, device="cpu")
    resumed.load_state_dict(state)
    assert decode_ids(next(iter(resumed))[0]).tolist() == after.tolist()
