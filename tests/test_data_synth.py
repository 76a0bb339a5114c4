"""Synthetic identities: a real insightface .rec whose identities a model can learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines.faces import generate, prototype, view
from data_pipelines.jpeg import decode_error, image_size
from data_pipelines.scan import scan_rec


def test_generate_writes_a_valid_insightface_rec(tmp_path: Path) -> None:
    generate(str(tmp_path / "train"), ids=6, per_id=5, seed=3, workers=1)
    scan = scan_rec(tmp_path / "train")
    assert scan.problems == [] and scan.num_images == 30
    assert scan.header_range == (31, 37) and scan.declared_classes == 6
    assert np.bincount(scan.labels).tolist() == [5] * 6
    assert scan.labels.tolist() != sorted(scan.labels.tolist())  # shuffled order
    buf = (tmp_path / "train.rec").read_bytes()
    for i in range(30):
        data = scan.image_bytes(buf, i)
        assert decode_error(data) is None and image_size(data) == (112, 112)
    generate(str(tmp_path / "again"), ids=6, per_id=5, seed=3, workers=1)
    assert (tmp_path / "again.rec").read_bytes() == buf  # deterministic in the seed


def _features(ids: int, views: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for c in range(ids):
        face = prototype(c, seed=0)
        rng = np.random.default_rng([stream, c])
        for _ in range(views):
            img = torch.from_numpy(view(face, rng)).permute(2, 0, 1).float() / 127.5 - 1
            xs.append(torch.nn.functional.avg_pool2d(img[None], 4)[0].flatten())
            ys.append(c)
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture
def one_thread():
    """Tiny ops: extra OpenMP threads only spin against other work on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_identities_are_learnable_from_unseen_views(one_thread) -> None:
    torch.manual_seed(0)
    ids = 20
    x, y = _features(ids, views=12, stream=1)
    xt, yt = _features(ids, views=5, stream=2)  # views never trained on
    model = torch.nn.Linear(x.shape[1], ids)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    assert losses[-1] < 0.25 * losses[0]
    assert accuracy > 0.5  # chance is 0.05; a linear probe on pixels, not a face model
