"""``pfc_ds.export``: ONNX / TorchScript / state_dict exports that reproduce the torch backbone.

* The verification's measures (relative error, each embedding's cosine) against a brute-force
  float64 reference; they do not change with the output's scale, and the cosine catches an
  error in a small-norm embedding that the relative error does not.
* An iresnet18 with BatchNorm statistics as after 4 training steps (embedding norms ~2,000,
  where a correct ONNX graph differs from torch by more than 1e-4 absolute) exports in all three
  formats; one weight perturbed inside each exported file is refused, naming both measures.
* ONNX through onnxruntime matches torch fp32 within 1e-4 for iresnet18, mobilefacenet and vit_t
  at batch 1 and 8 from one session (insightface #2406: batched mobilefacenet exports broke), with
  BatchNorm statistics that are neither the defaults nor the batch's, so a graph that dropped or
  mis-folded them, or used batch statistics, would fail.
* TorchScript and ``pt`` round-trip to identical outputs and weights (insightface #2065: weights
  that did not load).
* A failed verification is an error that leaves no file behind, from the API and the CLI.
* (slow) the issue's repro: the demo config with r18 at 112 px trained 4 steps, then the CLI
  exports its checkpoint as onnx, torchscript and pt.
* (slow) ZeRO-2 and ZeRO-3 checkpoints of the same training consolidate to identical weights, and
  the CLI exports one of them.
"""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pfc_ds.export as export_mod
from pfc_ds.backbones import get_backbone
from pfc_ds.export import (
    MIN_COSINE,
    RTOL,
    ExportError,
    VerificationError,
    agreement,
    export,
    failures,
    main,
    random_images,
)

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4


def _realistic(name: str, embedding_size: int = 512, seed: int = 0) -> nn.Module:
    """``name`` in eval mode with BatchNorm statistics of real activations, then perturbed.

    A fresh backbone's default statistics (mean 0, var 1) make iresnet's outputs ~1e6 at random
    init, where an absolute tolerance means nothing; statistics measured on images keep
    embeddings O(1) like a trained net's. The perturbation makes them differ from any batch's.
    """
    torch.manual_seed(seed)
    model = get_backbone(name, embedding_size).eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one pass gives the batch's statistics
        bn.train()
    with torch.no_grad():
        model(random_images(8, 112, seed=seed + 1))
        for bn in bns:
            bn.eval()
            bn.momentum = 0.1
            std = bn.running_var.sqrt()
            bn.running_mean += 0.2 * std * torch.randn_like(std)
            bn.running_var *= torch.empty_like(std).uniform_(0.5, 2.0)
    return model


def _images(batch: int, seed: int) -> torch.Tensor:
    """Other images than the export's own check uses (different seeds)."""
    return random_images(batch, 112, seed=1000 + seed)


def _brute_agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    """(relative error, worst cosine, max abs diff) with Python floats, element by element."""
    diff = max(abs(float(g) - float(w)) for g, w in zip(got.flat, want.flat, strict=True))
    scale = max(abs(float(w)) for w in want.flat)
    cosines = []
    for g, w in zip(got.tolist(), want.tolist(), strict=True):
        dot = sum(a * b for a, b in zip(g, w, strict=True))
        cosines.append(dot / (math.sqrt(sum(a * a for a in g)) * math.sqrt(sum(b * b for b in w))))
    return diff / scale, min(cosines), diff


def test_agreement_matches_a_brute_force_reference_at_any_scale():
    rng = np.random.default_rng(0)
    want = rng.standard_normal((5, 64)).astype(np.float32)
    got = (want + 1e-3 * rng.standard_normal(want.shape)).astype(np.float32)
    a = agreement(torch.from_numpy(got), torch.from_numpy(want))
    rel, cos, diff = _brute_agreement(got, want)
    assert a.relative_error == pytest.approx(rel, rel=1e-12)
    assert 1 - a.min_cosine == pytest.approx(1 - cos, rel=1e-6)
    assert a.max_abs_diff == pytest.approx(diff, rel=1e-12)
    assert a.worst_row == int(np.argmin([_brute_agreement(g[None], w[None])[1]
                                         for g, w in zip(got, want, strict=True)]))  # fmt: skip
    # The same relative disagreement at 4,096x the scale (a BatchNorm net early in training;
    # a power of two, so the scaled float32 values are exact): the max abs diff grows 4,096x,
    # the two measures do not move.
    big = agreement(torch.from_numpy(got) * 4096, torch.from_numpy(want) * 4096)
    assert big.relative_error == pytest.approx(a.relative_error, rel=1e-12)
    assert 1 - big.min_cosine == pytest.approx(1 - a.min_cosine, rel=1e-6)
    assert big.max_abs_diff == 4096 * a.max_abs_diff
    # Identical outputs: exactly 0 and 1, zero rows included.
    want[2] = 0
    same = agreement(torch.from_numpy(want), torch.from_numpy(want))
    assert (same.relative_error, same.min_cosine, same.max_abs_diff) == (0.0, 1.0, 0.0)
    assert failures(same, rtol=0.0, min_cosine=1.0, atol=0.0) == []


def test_cosine_catches_a_wrong_small_embedding_the_relative_error_misses():
    """Row 1 is 1,000x smaller than row 0 and 1% off: 1e-5 of the batch's scale (passes the
    relative error) but a cosine of 1 - 5e-5 (fails)."""
    want = torch.zeros(2, 4, dtype=torch.float64)
    want[0, 0], want[1, 1] = 1000.0, 1.0
    got = want.clone()
    got[1, 2] = 0.01
    a = agreement(got, want)
    assert a.relative_error == pytest.approx(1e-5)
    assert 1 - a.min_cosine == pytest.approx(1 - 1 / math.sqrt(1 + 1e-4), rel=1e-6)
    (problem,) = failures(a, RTOL, MIN_COSINE)
    assert problem.startswith("worst cosine 1 - 5e-05 < min-cosine 0.9999999 (embedding 1 ")
    # A non-finite output or another shape is a failure too.
    got[0, 0] = math.nan
    assert "non-finite" in failures(agreement(got, want), RTOL, MIN_COSINE)[0]
    assert failures(agreement(want[:1], want), RTOL, MIN_COSINE)


@pytest.fixture(scope="module")
def r18_four_steps() -> nn.Module:
    """iresnet18 whose BatchNorm statistics moved as in 4 training steps of 16 images (momentum
    0.1 from the defaults): embedding norms ~2,000, as the issue's 4-step checkpoint's ~3,200."""
    torch.manual_seed(0)
    model = get_backbone("r18", 512).train()
    with torch.no_grad():
        for step in range(4):
            model(random_images(16, 112, seed=50 + step))
    return model.eval()


def _r18() -> nn.Module:
    return get_backbone("r18", 512)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_a_large_scale_model_exports_in_every_format(r18_four_steps, tmp_path):
    """The issue's refusal: correct, yet more than 1e-4 off in absolute terms."""
    with torch.no_grad():
        norms = r18_four_steps(random_images(8, 112, seed=3)).norm(dim=1)
    assert norms.min() > 1000, norms
    for fmt in ("onnx", "torchscript", "pt"):
        agreed = export(r18_four_steps, fmt, tmp_path / f"r18.{fmt}", fresh=_r18)
        assert agreed.relative_error <= 1e-5 and agreed.min_cosine >= 1 - 1e-10, (fmt, agreed)
        if fmt == "onnx":
            assert agreed.max_abs_diff > 1e-4, agreed  # the old atol 1e-4 refused this
        else:
            assert agreed.max_abs_diff == 0.0, (fmt, agreed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.onnx", "r18.pt", "r18.torchscript"]


def _nudge(w: np.ndarray) -> np.ndarray:
    """One element moved by 1% of the array's largest magnitude."""
    w = w.copy()
    w.flat[0] += 0.01 * np.abs(w).max()
    return w


def _perturb_onnx(path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    (init,) = [i for i in proto.graph.initializer if i.name == "conv1.weight"]
    init.CopyFrom(numpy_helper.from_array(_nudge(numpy_helper.to_array(init)), init.name))
    onnx.save(proto, str(path))


def _perturb_torchscript(path: Path) -> None:
    module = torch.jit.load(str(path))
    with torch.no_grad():
        module.conv1.weight.copy_(torch.from_numpy(_nudge(module.conv1.weight.numpy())))
    torch.jit.save(module, str(path))


def _perturb_pt(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["conv1.weight"] = torch.from_numpy(_nudge(state["conv1.weight"].numpy()))
    torch.save(state, path)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt"])
def test_a_weight_perturbed_in_the_exported_file_is_refused(
    fmt, r18_four_steps, tmp_path, monkeypatch
):
    real = export_mod._WRITERS[fmt]
    perturb = {"onnx": _perturb_onnx, "torchscript": _perturb_torchscript, "pt": _perturb_pt}

    def write_then_perturb(model, path, example, opset):
        real(model, path, example, opset)
        perturb[fmt](path)

    monkeypatch.setitem(export_mod._WRITERS, fmt, write_then_perturb)
    with pytest.raises(VerificationError) as info:
        export(r18_four_steps, fmt, tmp_path / f"r18.{fmt}", fresh=_r18)
    message = str(info.value)
    pattern = (
        rf"{fmt} export of IResNet fails verification at batch 1: relative error (\S+) > rtol "
        r"0.0001 \(max abs diff \S+ against a largest \|embedding value\| of \S+\); "
        r"worst cosine 1 - (\S+) < min-cosine 0.9999999 \(embedding 0 of the batch\)"
    )
    match = re.fullmatch(pattern, message)
    assert match, message
    assert float(match.group(1)) > 3 * RTOL and float(match.group(2)) > 2e-7, message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_onnx_matches_torch_at_batch_1_and_8(name, tmp_path):
    import onnx
    import onnxruntime as ort

    model = _realistic(name)
    path = tmp_path / f"{name}.onnx"
    agreed = export(model, "onnx", path)
    assert 0.0 <= agreed.max_abs_diff <= ATOL, agreed
    assert agreed.relative_error <= 1e-5 and agreed.min_cosine >= 1 - 1e-10, agreed
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    onnx.checker.check_model(str(path), full_check=True)

    # Independently of export(): one session serves both batch sizes through the dynamic axis.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("input", "tensor(float)", "embedding")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 112, 112], inp.shape
    assert isinstance(out.shape[0], str) and out.shape[1:] == [512], out.shape
    got = {}
    for batch in (1, 8):
        x = _images(batch, seed=batch)
        got[batch] = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got[batch].shape == (batch, 512)
        assert np.abs(got[batch] - want).max() <= ATOL, (batch, np.abs(got[batch] - want).max())
        assert np.abs(want).max() > 1.0  # embeddings of a realistic scale, not ~0 or ~1e6
    # Eval-mode graph: a sample's embedding does not depend on the rest of the batch.
    alone = session.run(None, {"input": _images(8, seed=8)[:1].numpy()})[0]
    np.testing.assert_allclose(alone[0], got[8][0], rtol=0, atol=1e-5)
    # The perturbed statistics matter: with the defaults the embedding is far off.
    reset = copy.deepcopy(model)
    for m in reset.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    with torch.no_grad():
        assert np.abs(reset(_images(1, seed=1)).numpy() - got[1]).max() > 100 * ATOL


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_round_trip_is_exact(tmp_path):
    model = _realistic("mbf", 128)
    path = tmp_path / "mbf.ts"
    assert export(model, "torchscript", path).max_abs_diff == 0.0
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for batch in (1, 8):
            x = _images(batch, seed=batch)
            assert torch.equal(loaded(x), model(x)), batch


def test_pt_round_trip_loads_strictly_into_a_fresh_backbone(tmp_path):
    model = _realistic("mbf", 128)
    path = tmp_path / "mbf.pt"
    assert export(model, "pt", path, fresh=lambda: get_backbone("mbf", 128)).max_abs_diff == 0.0
    state = torch.load(path, weights_only=True)
    want = model.state_dict()
    assert list(state) == list(want)
    assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    fresh = get_backbone("mbf", 128)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        for batch in (1, 8):
            x = _images(batch, seed=batch)
            assert torch.equal(fresh(x), model(x)), batch


def _corrupting(real):
    """A writer that exports a copy of the model with one weight nudged by 1e-2."""

    def write(model, path, example, opset):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.fc.weight[0, 0] += 1e-2
        real(bad, path, example, opset)

    return write


def test_failed_check_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setitem(export_mod._WRITERS, "pt", _corrupting(export_mod._write_pt))
    model = get_backbone("tiny", 16, width=4).eval()
    path = tmp_path / "tiny.pt"
    with pytest.raises(VerificationError, match=r"at batch 1: relative error [0-9.e-]+ > rtol"):
        export(model, "pt", path, image_size=32)
    assert list(tmp_path.iterdir()) == []

    # An existing file is not replaced by a failed export.
    path.write_bytes(b"previous export")
    with pytest.raises(VerificationError):
        export(model, "pt", path, image_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]
    assert path.read_bytes() == b"previous export"


def test_weights_that_do_not_load_strictly_are_an_error(tmp_path):
    """insightface #2065: a file whose keys or shapes do not fit the backbone."""
    model = get_backbone("tiny", 16, width=4).eval()
    with pytest.raises(VerificationError, match=r"(?s)does not reload: .*mismatch for fc\.weight"):
        export(
            model,
            "pt",
            tmp_path / "t.pt",
            image_size=32,
            fresh=lambda: get_backbone("tiny", 8, width=4),
        )
    assert list(tmp_path.iterdir()) == []


def test_zero_tolerance_fails_on_a_real_difference(tmp_path):
    """At atol=0 a bias loaded 1e-6 off fails; the exact round trip (into the default NaN-filled
    copy, no ``fresh``) passes, so that default really loads every weight from the file."""
    model = get_backbone("tiny", 16, width=4).eval()

    def fresh() -> nn.Module:
        net = get_backbone("tiny", 16, width=4)
        net.load_state_dict = _perturbing_load(net)
        return net

    with pytest.raises(VerificationError, match=r"at batch 1: max abs diff [0-9.e-]+ > atol 0$"):
        export(model, "pt", tmp_path / "t.pt", image_size=32, atol=0.0, fresh=fresh)
    assert list(tmp_path.iterdir()) == []
    exact = export(model, "pt", tmp_path / "t.pt", image_size=32, rtol=0.0, min_cosine=1.0, atol=0)
    assert (exact.max_abs_diff, exact.relative_error, exact.min_cosine) == (0.0, 0.0, 1.0)


def _perturbing_load(net: nn.Module):
    real = net.load_state_dict

    def load(state, strict=True):
        state = dict(state, **{"fc.bias": state["fc.bias"] + 1e-6})
        return real(state, strict=strict)

    return load


def test_a_trace_frozen_at_one_batch_size_fails_naming_it(tmp_path):
    """The #2406 failure mode: a reshape that bakes in the example batch size."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(int(x.shape[0]), -1))

    with pytest.raises(VerificationError, match=r"at batch 1: it raised"):
        export(Frozen(), "torchscript", tmp_path / "f.ts", image_size=8)
    assert list(tmp_path.iterdir()) == []
    # torch.export sees the batch size turned into a constant and refuses at export time.
    with pytest.raises(ExportError, match=r"cannot give Frozen a dynamic batch axis"):
        export(Frozen(), "onnx", tmp_path / "f.onnx", image_size=8)
    assert list(tmp_path.iterdir()) == []


def _fake_checkpoint(monkeypatch, folder: Path) -> nn.Module:
    """Make ``load_backbone`` return a tiny model with a checkpoint's meta, without training."""
    from pfc_ds.checkpoint import CheckpointRef, reader

    model = get_backbone("tiny", 16, width=4).eval()
    meta = {
        "backbone": "tiny",
        "embedding_size": 16,
        "backbone_options": {"width": 4},
        "image_size": 32,
        "step": 7,
    }
    monkeypatch.setattr(reader, "load_backbone", lambda src: (model, CheckpointRef(folder, meta)))
    return model


def test_cli_failed_check_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    _fake_checkpoint(monkeypatch, tmp_path)
    monkeypatch.setitem(export_mod._WRITERS, "onnx", _corrupting(export_mod._write_onnx))
    out = tmp_path / "out" / "tiny.onnx"
    argv = ["--checkpoint", str(tmp_path), "--format", "onnx", "--output", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"at batch 1: relative error [0-9.e-]+ > rtol 0.0001 \(max abs diff", err), err
    assert list(out.parent.iterdir()) == []


def test_cli_summary_line(tmp_path, monkeypatch, capsys):
    _fake_checkpoint(monkeypatch, tmp_path)
    out = tmp_path / "tiny.pt"
    argv = ["--checkpoint", str(tmp_path), "--format", "pt", "--output", str(out)]
    assert main([*argv, "--batch-size-check", "2,3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == (
        f"{tmp_path} (step 7, tiny) -> {out} [pt], verified at batch 2, 3: relative error 0, "
        "worst cosine 1, max abs diff 0"
    )
    assert set(torch.load(out, weights_only=True)) == set(get_backbone("tiny", 16).state_dict())


def test_cli_missing_checkpoint_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    out = tmp_path / "x.onnx"
    assert main(["--checkpoint", str(missing), "--format", "onnx", "--output", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err
    # A folder without a complete checkpoint is the same error.
    missing.mkdir()
    assert main(["--checkpoint", str(missing), "--format", "onnx", "--output", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_the_issues_four_step_r18_exports_in_every_format(tmp_path):
    """Issue 26, item 1, as a user runs it: train.sh on the demo config with r18 at 112 px for 4
    steps, then ``python -m pfc_ds.export`` of its checkpoint, for each format."""
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "r18"
    sets = ["model.backbone=r18", "data.image_size=112", "model.embedding_size=512"]
    # The end-of-run eval of 600 pairs through r18 would be most of this test's time, and
    # the checkpoint it exports is the same without it.
    sets += ["train.batch_size=16", "eval.synthetic_pairs=0"]
    cmd = ["./train.sh", "configs/demo_cpu.yaml", "--max-steps", "4", "--output", str(out)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = out / "checkpoints" / "step00000004"
    for fmt in ("onnx", "torchscript", "pt"):
        path = tmp_path / f"m.{fmt}"
        cmd = [sys.executable, "-m", "pfc_ds.export", "--checkpoint", str(out)]
        cmd += ["--format", fmt, "--output", str(path)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (fmt, proc.stdout[-3000:] + proc.stderr[-3000:])
        pattern = (
            rf"{re.escape(str(folder))} \(step 4, r18\) -> {re.escape(str(path))} \[{fmt}\], "
            r"verified at batch 1, 8: relative error (\S+), worst cosine (1 - )?(\S+), "
            r"max abs diff (\S+)"
        )
        match = re.fullmatch(pattern, proc.stdout.strip())
        assert match, proc.stdout
        rel, one_minus_cos, diff = float(match[1]), float(match[3]), float(match[4])
        if fmt == "onnx":  # refused before: max abs diff > atol 1e-4
            assert rel <= 1e-5 and match[2] and one_minus_cos < 1e-10 and diff > 1e-4, match[0]
        else:  # bit for bit
            assert (rel, match[2], one_minus_cos, diff) == (0.0, None, 1.0, 0.0), match[0]


def _train_zero2_and_zero3(rank: int, world: int, tmp: str) -> dict:
    """The shipped zero{2,3}_fp32.json without gradient clipping, 3 steps of the tiny backbone.

    ZeRO-2 and ZeRO-3 sum the squared gradient norm in different orders, so once clipping binds
    (step 2 here) the two trainings drift apart by an ulp; without it they are bit-identical, so
    any difference left is the consolidation's.
    """
    from tests.trainer_helpers import cfg_dict, ds_config, train

    cfg = cfg_dict(train={"max_steps": 3})  # the same seed and data for both
    runs = {s: train(cfg, ds_config(s, gradient_clipping=0.0), f"{tmp}/z{s}") for s in (2, 3)}
    return {s: run["backbone"] for s, run in runs.items()}


@pytest.mark.slow
def test_zero2_and_zero3_checkpoints_consolidate_to_identical_weights(tmp_path):
    from pfc_ds.checkpoint import load_backbone
    from tests.dist import run_distributed

    live = run_distributed(_train_zero2_and_zero3, 2, str(tmp_path))[0]
    states = {}
    for stage in (2, 3):
        model, ref = load_backbone(tmp_path / f"z{stage}")
        assert (ref.zero_stage, ref.world_size, ref.step) == (stage, 2, 3)
        states[stage] = model.state_dict()
        # The checkpoint holds exactly the engine's fp32 weights at the end of training.
        assert all(torch.equal(states[stage][k], v) for k, v in live[stage].items())
    assert list(states[2]) == list(states[3])
    differ = [k for k in states[2] if not torch.equal(states[2][k], states[3][k])]
    assert not differ, differ
    init = get_backbone("tiny", 16, width=4).state_dict()
    assert not torch.equal(states[2]["fc.weight"], init["fc.weight"])  # training moved it

    out = tmp_path / "tiny.onnx"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pfc_ds.export", "--checkpoint", str(tmp_path / "z3")]
    cmd += ["--format", "onnx", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "z3" / "checkpoints" / "step00000003"
    pattern = (
        rf"{re.escape(str(folder))} \(step 3, tiny\) -> {re.escape(str(out))} \[onnx\], "
        r"verified at batch 1, 8: relative error (\S+), worst cosine .*, max abs diff (\S+)"
    )
    match = re.fullmatch(pattern, proc.stdout.strip())
    assert match, proc.stdout
    assert float(match.group(1)) <= RTOL and float(match.group(2)) <= ATOL

    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model, _ = load_backbone(tmp_path / "z3")
    # The pt format from the same checkpoint is exactly the consolidated state_dict.
    pt = tmp_path / "tiny.pt"
    assert main(["--checkpoint", str(tmp_path / "z2"), "--format", "pt", "--output", str(pt)]) == 0
    saved = torch.load(pt, weights_only=True)
    assert list(saved) == list(states[2])
    assert all(torch.equal(saved[k], v) for k, v in states[2].items())
    x = random_images(8, 32, seed=3)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - want).max() <= ATOL
