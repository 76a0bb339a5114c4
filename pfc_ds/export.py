"""Export a trained backbone for deployment, verified against torch before it is written.

    python -m pfc_ds.export --checkpoint OUTPUT_OR_TAG --format onnx --output r50.onnx
    python -m pfc_ds.export --checkpoint OUTPUT_OR_TAG --format torchscript --output r50.ts
    python -m pfc_ds.export --checkpoint OUTPUT_OR_TAG --format pt --output r50.pt

``OUTPUT_OR_TAG`` is a training output folder (its latest checkpoint) or one tag folder; any ZeRO
stage, world size and precision gives the fp32 master weights (``pfc_ds.tools.backbone``).

Input spec of every format: ``input``, float32 NCHW ``(batch, 3, H, W)`` RGB images normalised as
``(pixel - 127.5) / 127.5`` (so in [-1, 1]), H = W = the training ``image_size`` (112 unless the
checkpoint says otherwise). Output: ``embedding``, float32 ``(batch, embedding_size)``, raw (not
L2-normalised; normalise before cosine similarity). The batch axis is dynamic.

Formats:

* ``pt``: ``torch.save`` of the fp32 ``state_dict`` (insightface's key layout), checked by loading
  it strictly into a fresh backbone.
* ``torchscript``: ``torch.jit.trace``, saved with ``torch.jit.save`` and reloaded for the check.
* ``onnx``: ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis, checked with
  ``onnx.checker`` and run by onnxruntime (CPUExecutionProvider).

Why the dynamo (``torch.export``) ONNX exporter: both exporters give correct graphs for iresnet,
mobilefacenet and ViT in torch 2.13, but the TorchScript-based one (``dynamo=False``) is
deprecated and slated for removal, and it traces: shape logic that goes through Python values is
frozen at the example batch size without an error (the failure mode of batched mobilefacenet
exports, insightface #2406). ``torch.export`` keeps the batch a symbol and refuses a model that
turns it into a constant. We call it ourselves, because ``torch.onnx.export`` would catch that
refusal and quietly export with the batch fixed to the example's size instead.

Every export is verified before it counts: the written artifact is reloaded (one session or module
for all sizes, so the dynamic axis is exercised) and run on random images at each batch size of
``--batch-size-check`` (default 1 and 8); the max abs difference from the fp32 torch model must
not exceed ``--atol`` (default 1e-4). A failed check exits 1 naming the batch size and the
difference, and leaves nothing at ``--output`` (the file is written under a temporary name and
renamed only after the check; an existing file there is left as it was).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx", "torchscript", "pt")
DEFAULT_OPSET = 18  # torch.onnx's own (torchlib) opset; onnxruntime >= 1.14 runs it
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
_TRACE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1


class ExportError(RuntimeError):
    """The model cannot be exported as asked (e.g. its batch axis cannot be dynamic)."""


class VerificationError(ExportError):
    """The exported artifact does not reproduce the torch model within tolerance."""


def random_images(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Random 8-bit RGB images, normalised as the input spec says: values in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g)
    return (pixels.float() - 127.5) / 127.5


def max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want|; a shape mismatch or a non-finite value counts as an infinite diff."""
    if got.shape != want.shape:
        return math.inf
    diff = (got.double() - want.double()).abs()
    return float(diff.max()) if torch.isfinite(diff).all() else math.inf


def _nan_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every float tensor NaN, so a weight the file lacks shows."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*fresh.parameters(), *fresh.buffers()]:
            if t.is_floating_point():
                t.fill_(math.nan)
    return fresh


def _write_pt(model: nn.Module, path: Path, example: torch.Tensor, opset: int | None) -> None:
    torch.save(model.state_dict(), path)


def _load_pt(path: Path, fresh: Callable[[], nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    net = fresh()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.float().eval()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' known noise, which says nothing about this model.

    torch.jit is deprecated in favour of torch.export, but TorchScript is still what libtorch (C++)
    deployments load. Tracing freezes shape checks on Python values (ViT's input-size check); the
    verification at several batch sizes is what shows a trace generalises. torch.export warns
    about its own deprecated pytree API, and the ONNX exporter logs that torchvision is absent.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec")
            yield
    finally:
        registration.setLevel(level)


def _write_torchscript(
    model: nn.Module, path: Path, example: torch.Tensor, opset: int | None
) -> None:
    with _quiet():
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path))


def _load_torchscript(path: Path, fresh: object) -> Callable[[torch.Tensor], torch.Tensor]:
    with _quiet():
        return torch.jit.load(str(path), map_location="cpu").eval()


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor, opset: int | None) -> None:
    # torch.export first, on our own: torch.onnx.export, handed a model whose batch axis cannot
    # be dynamic, silently re-exports it with the axis fixed to the example's size.
    batch = torch.export.Dim("batch")
    with _quiet():
        try:
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: batch},), strict=False
            )
        except torch._dynamo.exc.UserError as e:
            raise ExportError(
                f"torch.export cannot give {type(model).__name__} a dynamic batch axis: {e}"
            ) from e
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            verbose=False,
            opset_version=DEFAULT_OPSET if opset is None else opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
        onnx_program.save(str(path), external_data=False)


def _load_onnx(path: Path, fresh: object) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    names = ([i.name for i in graph.input], [o.name for o in graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise VerificationError(f"ONNX graph has inputs/outputs {names}, expected input/embedding")
    for value in (graph.input[0], graph.output[0]):
        if not value.type.tensor_type.shape.dim[0].dim_param:
            raise VerificationError(f"ONNX {value.name} has a fixed batch size, not a dynamic axis")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

    return run


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "pt": _write_pt}
_LOADERS = {"onnx": _load_onnx, "torchscript": _load_torchscript, "pt": _load_pt}


def export(
    model: nn.Module,
    fmt: str,
    output: str | os.PathLike,
    image_size: int = 112,
    check_batches: Sequence[int] = (1, 8),
    atol: float = 1e-4,
    *,
    opset: int | None = None,
    fresh: Callable[[], nn.Module] | None = None,
) -> float:
    """Write ``model`` to ``output`` as ``fmt`` and return the max abs diff of the verification.

    ``model`` is put in fp32 eval mode (in place). The artifact is reloaded and compared with the
    torch model at every batch size in ``check_batches``; above ``atol`` (or if it fails to run) a
    ``VerificationError`` is raised and ``output`` is left untouched; a model whose batch axis
    cannot be dynamic in ONNX raises ``ExportError``, of which that is a subclass. ``fresh``
    builds an untrained backbone of the same architecture for the ``pt`` check (e.g.
    ``lambda: get_backbone("r50", 512)``); without it the check loads into a NaN-filled copy of
    ``model``, which still catches a missing weight. ``opset`` is the ONNX opset (default 18).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if not check_batches or any(int(b) < 1 for b in check_batches):
        raise ValueError(f"check_batches must be positive batch sizes, got {check_batches!r}")
    model = model.float().eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename is atomic; created by the writer, so it gets the umask's mode.
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad():
            _WRITERS[fmt](model, tmp, random_images(_TRACE_BATCH, image_size, seed=1), opset)
            try:
                loaded = _LOADERS[fmt](tmp, fresh or (lambda: _nan_copy(model)))
            except ExportError:
                raise
            except Exception as e:  # a checker finding, keys that do not load strictly...
                raise VerificationError(
                    f"{fmt} export of {type(model).__name__} does not reload: "
                    f"{type(e).__name__}: {str(e).strip()[:500]}"
                ) from e
            worst = 0.0
            for batch in check_batches:
                x = random_images(int(batch), image_size, seed=100 + int(batch))
                try:
                    got = loaded(x)
                except Exception as e:  # e.g. a reshape frozen at the trace's batch size
                    raise VerificationError(
                        f"{fmt} export of {type(model).__name__} fails verification at batch "
                        f"{batch}: it raised {type(e).__name__}: {str(e).strip()[:500]}"
                    ) from e
                diff = max_abs_diff(got, model(x))
                if not diff <= atol:
                    raise VerificationError(
                        f"{fmt} export of {type(model).__name__} fails verification at batch "
                        f"{batch}: max abs diff {diff:.3g} > atol {atol:g}"
                    )
                worst = max(worst, diff)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="training output folder or tag folder")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument(
        "--batch-size-check",
        default="1,8",
        help="comma-separated batch sizes the export is verified at (default 1,8)",
    )
    p.add_argument("--atol", type=float, default=1e-4, help="max abs diff allowed (default 1e-4)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    args = p.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batch_size_check.split(",") if b.strip())
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        p.error(
            f"--batch-size-check wants positive integers like 1,8, got {args.batch_size_check!r}"
        )

    if not Path(args.checkpoint).exists():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    # DeepSpeed's consolidation prints its progress; stdout carries only the summary line.
    with contextlib.redirect_stdout(sys.stderr):
        from pfc_ds.backbones import get_backbone
        from pfc_ds.checkpoint import reader

        try:
            model, ref = reader.load_backbone(args.checkpoint)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    meta = {**ref.meta, "folder": str(ref.folder)}

    def fresh() -> nn.Module:
        return get_backbone(
            meta["backbone"], meta["embedding_size"], **meta.get("backbone_options", {})
        )

    try:
        diff = export(
            model,
            args.format,
            args.output,
            image_size=int(meta["image_size"]),
            check_batches=batches,
            atol=args.atol,
            opset=args.opset,
            fresh=fresh,
        )
    except ExportError as e:
        print(f"error: {e}; nothing written to {args.output}", file=sys.stderr)
        return 1
    sizes = ", ".join(str(b) for b in batches)
    print(
        f"{meta['folder']} (step {meta['step']}, {meta['backbone']}) -> {args.output} "
        f"[{args.format}], verified at batch {sizes}: max abs diff {diff:.3g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
