"""The trainer on real data: ``data.source: rec`` through ``data_pipelines.build_loader`` (DALI).

A small learnable insightface-layout ``.rec`` is written by ``data_pipelines.synth`` (20 ids x 7
images = 140, a global batch of 16 leaves 12 dropped per epoch, 8 steps per epoch).

* Fast: the trainer's data seam (``pfc_ds.train.build.build_loader`` from a trainer ``Config``)
  yields int64 labels that are exactly the file's labels in the documented global order, the
  same number of steps on both ranks as ``len()`` promises, and ``state_dict``/``load_state_dict``
  continue with the very batch an uninterrupted loader yields next (mid-epoch and at the end
  of an epoch).
* Fast: a ``.rec`` holding a label >= the configured ``num_classes`` is refused by that seam
  with a ``DataError`` naming the label, the record key and its byte offset.
* Slow, 2 gloo ranks (one spawn, ~15 s): ``Trainer`` trains 12 epochs (96 steps) on the
  ``.rec``; the loss falls, every step is in ``metrics.jsonl`` with its epoch, each rank saw
  exactly the file's labels of its share of the global order as int64 < num_classes, both ranks
  ran ``len(loader)`` steps per epoch; a run stopped mid-epoch and resumed from its checkpoint
  continues with the same batch (labels and pixels) and the same losses as the uninterrupted run,
  and so does one resumed from the last step of an epoch; ``Trainer.setup`` refuses the
  bad-label file before any step.
* after a resume from the last step of an epoch the trainer's epoch counter
  (``metrics.jsonl`` ``epoch``) follows the loader into the next epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.dist import run_distributed
from tests.trainer_helpers import ds_config, make_trainer

IDS, PER_ID = 20, 7  # 140 images
NUM_IMAGES = IDS * PER_ID
BATCH, WORLD = 8, 2
GLOBAL = BATCH * WORLD
STEPS_PER_EPOCH = NUM_IMAGES // GLOBAL  # 8 (last_batch drop: 12 images left out per epoch)
EPOCHS = 12
STEPS = EPOCHS * STEPS_PER_EPOCH  # 96
STOP = 43  # mid-epoch 5: 3 steps (48 samples) into it
assert STOP % STEPS_PER_EPOCH > 0
SEED = 7


# ---- data -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rec(tmp_path_factory) -> str:
    """Prefix of the synthetic ``.rec``/``.idx`` (+ ``property``), written once per module."""
    from data_pipelines.faces import generate

    prefix = str(tmp_path_factory.mktemp("synth") / "train")
    generate(prefix, IDS, PER_ID, seed=0, workers=1)
    return prefix


def _file_labels(prefix: str) -> np.ndarray:
    """Labels of the image records in file order, read with the plain RecordIO reader."""
    from data_pipelines.recordio import iter_records, unpack_payload

    labels = []
    for _, payload in iter_records(Path(prefix + ".rec").read_bytes()):
        header, lab, image = unpack_payload(payload)
        if image:  # header and identity records carry no image
            assert header.flag == 0
            labels.append(lab[0])
    out = np.asarray(labels)
    assert out.shape == (NUM_IMAGES,) and (out == np.floor(out)).all()
    return out.astype(np.int64)


def _expected_labels(truth: np.ndarray, epoch: int, position: int, rank: int) -> np.ndarray:
    """Labels of ``rank``'s batch that ends global position ``position`` of ``epoch``.

    The documented order (``data_pipelines.sampler``): one permutation per (seed, epoch), cut
    into global batches; rank r takes the r-th block of ``BATCH`` of each.
    """
    order = np.random.default_rng([SEED, epoch]).permutation(NUM_IMAGES)
    first = position - GLOBAL + rank * BATCH
    return truth[order[first : first + BATCH]]


def _cfg(prefix: str, tmp: str | Path, **train: Any) -> dict[str, Any]:
    return {
        "model": {"backbone": "tiny", "embedding_size": 32, "options": {"width": 8}},
        # A plain normalised softmax (no margin) and a small head LR: the class centres start at
        # norm ~0.06, so a larger SparseSGD step swings them far and the loss first jumps; with
        # these settings it falls steadily from ~4.9 to ~1.2 in 96 steps.
        "head": {
            "margin": [1.0, 0.0, 0.0],
            "scale": 16.0,
            "sample_rate": 0.5,
            "optimizer": "sgd",
            "lr": 1e-4,
            "momentum": 0.9,
            "weight_decay": 5e-4,
        },
        "data": {
            "source": "rec",  # reader: the default (external)
            "seed": SEED,  # the data order's seed
            "image_size": 56,  # decoded 112 px images are resized (as in the CPU demo)
            "path": prefix,
            "cache_dir": str(Path(tmp) / "cache"),
            "num_threads": 1,
        },
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "warmup_epochs": 0.25},
        "train": {
            "batch_size": BATCH,
            "epochs": EPOCHS,
            "seed": SEED,
            "log_every": 1,
            "save_every": 0,
            "keep_last": 0,
            **train,
        },
    }


def _bad_rec(prefix: str) -> tuple[int, int]:
    """insightface layout declaring 4 classes whose record key 5 has label 7; (key, offset)."""
    from data_pipelines.insightface import property_path
    from data_pipelines.jpeg import encode_jpeg
    from data_pipelines.recordio import RecordWriter, pack_payload

    labels = [0, 1, 2, 3, 7, 1]
    jpeg = encode_jpeg(np.full((112, 112, 3), 128, np.uint8))
    first_id = len(labels) + 1
    bad = None
    with RecordWriter(prefix) as w:
        w.write(0, pack_payload((float(first_id), float(first_id + 4)), b""))
        for key, label in enumerate(labels, 1):
            offset = w.write(key, pack_payload(float(label), jpeg))
            if label >= 4:
                bad = (key, offset)
        for c in range(4):
            w.write(first_id + c, pack_payload((float(c), 1.0), b""))
    property_path(prefix).write_text("4,112,112\n")
    assert bad is not None
    return bad


# ---- fast: the trainer's data seam ---------------------------------------------------------------


def _seam_loader(prefix: str, tmp: Path, rank: int):
    from pfc_ds.train.build import build_loader
    from pfc_ds.train.config import Config

    cfg = Config.from_dict(_cfg(prefix, tmp))
    loader, num_classes = build_loader(cfg, rank=rank, world_size=WORLD, device="cpu")
    assert num_classes == loader.num_classes  # data.num_classes unset: the file's count
    return loader


def test_trainer_data_seam_reads_the_rec_in_order_and_resumes(rec: str, tmp_path: Path) -> None:
    truth = _file_labels(rec)
    loaders = [_seam_loader(rec, tmp_path, r) for r in range(WORLD)]
    for r, loader in enumerate(loaders):
        assert (loader.num_images, loader.num_classes, len(loader)) == (
            NUM_IMAGES,
            IDS,
            STEPS_PER_EPOCH,
        )
        steps = 0
        for images, labels in loader:
            steps += 1
            assert images.shape == (BATCH, 3, 56, 56) and images.dtype == torch.float32
            assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
            state = loader.state_dict()
            assert (state["epoch"], state["position"]) == (0, steps * GLOBAL)
            want = _expected_labels(truth, 0, steps * GLOBAL, r)
            np.testing.assert_array_equal(labels.numpy(), want, err_msg=f"rank {r} step {steps}")
        assert steps == STEPS_PER_EPOCH, f"rank {r}"

    # state_dict / load_state_dict: a fresh loader continues with the next batch, bit for bit;
    # once mid-epoch and once from the end of an epoch (it must roll into the next epoch).
    for stop in (3, STEPS_PER_EPOCH):
        ref = _seam_loader(rec, tmp_path, 1)
        it = iter(ref)
        for _ in range(stop):
            next(it)
        state = ref.state_dict()
        want_images, want_labels = next(iter(ref))
        want_state = ref.state_dict()
        fresh = _seam_loader(rec, tmp_path, 1)
        fresh.load_state_dict(state)
        got_images, got_labels = next(iter(fresh))
        assert torch.equal(got_labels, want_labels), stop
        assert torch.equal(got_images, want_images), stop
        assert fresh.state_dict() == want_state, stop
        assert fresh.state_dict()["epoch"] == (1 if stop == STEPS_PER_EPOCH else 0)


def test_label_beyond_num_classes_is_refused_naming_label_and_record(tmp_path: Path) -> None:
    from data_pipelines import DataError
    from pfc_ds.train.build import build_loader
    from pfc_ds.train.config import Config

    prefix = str(tmp_path / "bad" / "train")
    Path(prefix).parent.mkdir()
    key, offset = _bad_rec(prefix)
    cfg = _cfg(prefix, tmp_path)
    cfg["data"]["num_classes"] = 4
    with pytest.raises(DataError) as err:
        build_loader(Config.from_dict(cfg), rank=0, world_size=1, device="cpu")
    msg = str(err.value)
    assert f"{prefix}.rec" in msg, msg
    assert f"key={key} offset={offset}" in msg, msg
    assert "label 7 >= num_classes 4" in msg, msg
    assert msg.count("label_range") == 1, msg  # only the bad record is named


# ---- slow: the real Trainer on 2 gloo ranks --------------------------------------------------------


class _Recorder:
    """Wraps the trainer's loader; records what every ``next()`` yields (and some pixels)."""

    def __init__(self, inner, keep_images: tuple[int, ...] = ()) -> None:
        self.inner = inner
        self.keep_images = set(keep_images)
        self.batches: list[dict[str, Any]] = []
        self.images: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> _Recorder:
        iter(self.inner)
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self.inner)
        state = self.inner.state_dict()
        n = len(self.batches)
        self.batches.append(
            {
                "epoch": state["epoch"],
                "position": state["position"],
                "labels": labels.clone(),
                "valid": self.inner.valid,
            }
        )
        if n in self.keep_images:
            self.images[n] = images.clone()
        return images, labels

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _fit(cfg: dict, output: str, *, resume: bool = False, stop_at=None, keep_images=()):
    trainer = make_trainer(cfg, ds_config(0), output, resume=resume)
    at_setup = {"step": trainer.step, "epoch": trainer.epoch, "data": trainer.loader.state_dict()}
    recorder = _Recorder(trainer.loader, keep_images)
    trainer.loader = recorder
    trainer.fit(stop_at=stop_at)
    return {
        "epoch": trainer.epoch,
        "loader_epoch": recorder.inner.epoch,
        "len": len(recorder),
        "total_steps": trainer.total_steps,
        "at_setup": at_setup,
        "batches": recorder.batches,
        "images": recorder.images,
        "losses": [h["loss"] for h in trainer.history],
    }


def _train_on_rec(rank: int, world: int, tmp: str, prefix: str, bad_prefix: str) -> dict:
    from data_pipelines import DataError

    cfg = _cfg(prefix, tmp)
    out = {
        "full": _fit(cfg, f"{tmp}/full", keep_images=(STOP,)),
        "part": _fit(cfg, f"{tmp}/part", stop_at=STOP),
    }
    state = torch.load(
        f"{tmp}/part/checkpoints/step{STOP:08d}/trainer_state_{rank:05d}.pt", weights_only=False
    )
    out["saved"] = {"step": state["step"], "epoch": state["epoch"], "data": state["data"]}
    out["resumed"] = _fit(cfg, f"{tmp}/part", resume=True, keep_images=(0,))
    # a checkpoint of the last step of epoch 0, resumed for two steps of epoch 1
    out["edge"] = _fit(cfg, f"{tmp}/edge", stop_at=STEPS_PER_EPOCH)
    out["edge_resumed"] = _fit(cfg, f"{tmp}/edge", resume=True, stop_at=STEPS_PER_EPOCH + 2)

    bad = _cfg(bad_prefix, tmp)
    bad["data"]["num_classes"] = 4
    try:
        trainer = make_trainer(bad, ds_config(0), f"{tmp}/bad")
        out["refused"], out["bad_step"] = None, trainer.step
    except DataError as exc:  # refused while building the loader, before any step
        out["refused"], out["bad_step"] = str(exc), None
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(rec: str, tmp_path_factory) -> tuple[Path, list[dict], np.ndarray, tuple, str]:
    tmp = tmp_path_factory.mktemp("train_rec")
    bad_prefix = str(tmp / "bad_rec" / "train")
    Path(bad_prefix).parent.mkdir()
    bad = _bad_rec(bad_prefix)
    results = run_distributed(_train_on_rec, WORLD, str(tmp), rec, bad_prefix)
    return tmp, results, _file_labels(rec), bad, bad_prefix


@pytest.mark.slow
def test_trainer_learns_from_the_rec(trained) -> None:
    tmp, results, _, _, _ = trained
    records = _records(tmp / "full" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in records] == [
        (s - 1) // STEPS_PER_EPOCH for s in range(1, STEPS + 1)
    ]
    losses = [r["loss"] for r in records]
    assert all(np.isfinite(losses)), losses
    last_epoch = float(np.mean(losses[-STEPS_PER_EPOCH:]))
    assert last_epoch < 0.5 * losses[0], losses  # ~1.2 vs ~4.9
    assert last_epoch < np.log(IDS), losses  # well below a uniform guess over the classes
    assert last_epoch < 0.5 * float(np.mean(losses[:STEPS_PER_EPOCH])), losses
    # metrics.jsonl (rank 0) holds rank 0's history; the loss is the global batch's on every rank
    np.testing.assert_allclose(results[0]["full"]["losses"], losses, rtol=1e-6)
    np.testing.assert_allclose(results[1]["full"]["losses"], losses, rtol=1e-5)
    assert (tmp / "full" / "backbone.pt").is_file()


@pytest.mark.slow
def test_trainer_reads_each_ranks_share_with_int64_labels(trained) -> None:
    _, results, truth, _, _ = trained
    for rank, res in enumerate(results):
        full = res["full"]
        assert full["len"] == STEPS_PER_EPOCH and full["total_steps"] == STEPS
        batches = full["batches"]
        assert len(batches) == STEPS, f"rank {rank}"
        per_epoch = [sum(b["epoch"] == e for b in batches) for e in range(EPOCHS)]
        assert per_epoch == [STEPS_PER_EPOCH] * EPOCHS, f"rank {rank}: {per_epoch}"
        for i, b in enumerate(batches):
            lab = b["labels"]
            assert lab.dtype == torch.int64 and lab.shape == (BATCH,)
            assert int(lab.min()) >= 0 and int(lab.max()) < IDS
            assert b["epoch"] == i // STEPS_PER_EPOCH
            assert b["position"] == (i % STEPS_PER_EPOCH + 1) * GLOBAL
            assert b["valid"] == BATCH
            want = _expected_labels(truth, b["epoch"], b["position"], rank)
            np.testing.assert_array_equal(lab.numpy(), want, err_msg=f"rank {rank} step {i + 1}")
    # identical step structure on both ranks (the Partial FC all-gather needs it)
    shape = [[(b["epoch"], b["position"]) for b in r["full"]["batches"]] for r in results]
    assert shape[0] == shape[1]
    # epochs are reshuffled: epoch 1 is not epoch 0 again
    e0 = torch.cat([b["labels"] for b in results[0]["full"]["batches"][:STEPS_PER_EPOCH]])
    e1 = torch.cat(
        [b["labels"] for b in results[0]["full"]["batches"][STEPS_PER_EPOCH : 2 * STEPS_PER_EPOCH]]
    )
    assert not torch.equal(e0, e1)


@pytest.mark.slow
def test_resume_continues_at_the_saved_data_position(trained) -> None:
    tmp, results, _, _, _ = trained
    for rank, res in enumerate(results):
        full, part, resumed, saved = res["full"], res["part"], res["resumed"], res["saved"]
        assert len(part["batches"]) == STOP
        epoch, into = divmod(STOP, STEPS_PER_EPOCH)  # 5, 3
        want_data = {"epoch": epoch, "position": into * GLOBAL}
        assert saved["step"] == STOP and saved["epoch"] == epoch
        assert {k: saved["data"][k] for k in want_data} == want_data, saved["data"]
        assert saved["data"]["num_images"] == NUM_IMAGES and saved["data"]["reader"] == "external"
        setup = resumed["at_setup"]
        assert setup["step"] == STOP and setup["epoch"] == epoch
        assert {k: setup["data"][k] for k in want_data} == want_data

        # the first batch after the resume is the uninterrupted run's batch of step STOP + 1
        first, want = resumed["batches"][0], full["batches"][STOP]
        assert (first["epoch"], first["position"]) == (want["epoch"], want["position"])
        assert torch.equal(first["labels"], want["labels"]), f"rank {rank}"
        assert torch.equal(resumed["images"][0], full["images"][STOP]), f"rank {rank}"
        # ... and so is every later one, and the losses follow the uninterrupted run
        assert len(resumed["batches"]) == STEPS - STOP
        for got, exp in zip(resumed["batches"], full["batches"][STOP:], strict=True):
            assert (got["epoch"], got["position"]) == (exp["epoch"], exp["position"])
            assert torch.equal(got["labels"], exp["labels"])
        np.testing.assert_allclose(part["losses"], full["losses"][:STOP], rtol=1e-6)
        np.testing.assert_allclose(resumed["losses"], full["losses"][STOP:], rtol=1e-5)

    records = _records(tmp / "part" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    full_records = _records(tmp / "full" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [r["epoch"] for r in full_records]


@pytest.mark.slow
def test_trainer_setup_refuses_a_label_beyond_num_classes(trained) -> None:
    tmp, results, _, (key, offset), bad_prefix = trained
    for rank, res in enumerate(results):
        msg = res["refused"]
        assert msg is not None, f"rank {rank}: setup accepted the bad .rec"
        assert f"{bad_prefix}.rec" in msg and f"key={key} offset={offset}" in msg, msg
        assert "label 7 >= num_classes 4" in msg, msg
        assert res["bad_step"] is None  # refused while building the loader, before step 0
    assert not (tmp / "bad" / "metrics.jsonl").exists()
    assert not (tmp / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_resume_from_the_last_step_of_an_epoch_reads_the_next_epoch(trained) -> None:
    _, results, _, _, _ = trained
    for rank, res in enumerate(results):
        full, resumed = res["full"], res["edge_resumed"]
        assert resumed["at_setup"]["data"]["position"] == STEPS_PER_EPOCH * GLOBAL  # epoch 0 done
        assert len(resumed["batches"]) == 2
        want = full["batches"][STEPS_PER_EPOCH : STEPS_PER_EPOCH + 2]
        for k, (got, exp) in enumerate(zip(resumed["batches"], want, strict=True)):
            assert (got["epoch"], got["position"]) == (exp["epoch"], exp["position"])
            assert (got["epoch"], got["position"]) == (1, (k + 1) * GLOBAL), f"rank {rank}"
            assert torch.equal(got["labels"], exp["labels"]), f"rank {rank}"
        assert resumed["loader_epoch"] == 1
        np.testing.assert_allclose(
            resumed["losses"], full["losses"][STEPS_PER_EPOCH : STEPS_PER_EPOCH + 2], rtol=1e-5
        )


@pytest.mark.slow
def test_resume_from_the_last_step_of_an_epoch_counts_the_epoch(trained) -> None:
    tmp, results, _, _, _ = trained
    for rank, res in enumerate(results):
        assert res["edge_resumed"]["epoch"] == res["edge_resumed"]["loader_epoch"] == 1, rank
    records = _records(tmp / "edge" / "metrics.jsonl")
    assert [(r["step"], r["epoch"]) for r in records[-2:]] == [(9, 1), (10, 1)]
