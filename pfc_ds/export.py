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
``--batch-size-check`` (default 1 and 8), against the fp32 torch model on the same images. Two
measures, both judged by the output's own scale, must hold:

* relative error ``max |export - torch| / max |torch|`` over the batch <= ``--rtol`` (1e-4);
* every embedding's cosine with torch's (float64) >= ``--min-cosine`` (0.9999999, i.e. 1 - 1e-7).

Why relative: the embeddings are raw, and their norms are whatever the weights make them: about
3,200 for an iresnet18 after 4 steps (BatchNorm running statistics still near their defaults),
where onnxruntime's correct graph differs from torch fp32 by 1.2e-3 absolute, i.e. 2.5e-6 of the
largest value (torch fp32 differs from float64 by as much). An absolute bound rejects correct
exports at a large scale and passes wrong ones at a small scale. The cosine is what the
embedding is used for, and it catches an error the batch's largest value hides (an embedding of
a small norm). Measured on random images: correct ONNX exports of r18, mbf, vit_t and the
4-step r18 show relative errors of 1.6e-6 to 2.5e-6 and cosines of 1 - 2.5e-12 or closer;
TorchScript and ``pt`` reproduce torch bit for bit. One first-layer weight nudged by 1% of that
layer's largest weight gives relative errors of 6.7e-4 to 1.1e-3 and cosines of 1 - 3e-7 to
1 - 8e-7, and fails both. A change whose effect stays within the bounds passes: the same nudge
to vit_t's position embedding moves its output by 2e-5 of its scale (cosine 1 - 1.6e-10), to
the 4-step r18's last convolution by no more than fp32's own noise. ``--atol`` adds an
absolute bound on top, off by default.

A failed check exits 1 naming the batch size, the measure and by how much, and leaves nothing at
``--output`` (the file is written under a temporary name and renamed only after the check; an
existing file there is left as it was).
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FORMATS = ("onnx", "torchscript", "pt")
DEFAULT_OPSET = 18  # torch.onnx's own (torchlib) opset; onnxruntime >= 1.14 runs it
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
_TRACE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1
RTOL = 1e-4  # max |export - torch| / max |torch|; correct exports measure ~1e-6 (module docstring)
MIN_COSINE = 1 - 1e-7  # each embedding against torch's; correct exports: 1 - 2.5e-12 or closer


class ExportError(RuntimeError):
    """The model cannot be exported as asked (e.g. its batch axis cannot be dynamic)."""


class VerificationError(ExportError):
    """The exported artifact does not reproduce the torch model within tolerance."""


def random_images(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Random 8-bit RGB images, normalised as the input spec says: values in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g)
    return (pixels.float() - 127.5) / 127.5


@dataclass(frozen=True)
class Agreement:
    """How closely an export's outputs follow the torch model's (the worst over the checks).

    ``relative_error``: ``max |got - want| / max |want|``; ``min_cosine``: the lowest cosine
    between an embedding and torch's, in float64; ``max_abs_diff``: ``max |got - want|`` (for
    the record, and ``--atol``); ``scale``: ``max |want|``. A shape mismatch or a non-finite
    value gives an infinite error and a cosine of -inf.
    """

    relative_error: float
    min_cosine: float
    max_abs_diff: float
    scale: float
    worst_row: int = 0  # the embedding of the lowest cosine

    @staticmethod
    def exact() -> Agreement:
        return Agreement(0.0, 1.0, 0.0, 0.0)

    def worse(self, other: Agreement) -> Agreement:
        """Each measure's worst of the two (the row and scale of the lower cosine)."""
        low = self if self.min_cosine <= other.min_cosine else other
        return Agreement(
            max(self.relative_error, other.relative_error),
            low.min_cosine,
            max(self.max_abs_diff, other.max_abs_diff),
            max(self.scale, other.scale),
            low.worst_row,
        )

    def text(self) -> str:
        """``relative error 2.5e-06, worst cosine 1 - 1.6e-12, max abs diff 0.00122``."""
        return (
            f"relative error {self.relative_error:.3g}, worst cosine "
            f"{cosine_text(self.min_cosine)}, max abs diff {self.max_abs_diff:.3g}"
        )


def cosine_text(c: float) -> str:
    """A cosine near 1 as ``1 - 1.6e-12`` (``0.9999999999984`` hides how near)."""
    return f"1 - {1.0 - c:.2g}" if 0.0 < 1.0 - c < 1e-4 else f"{c:.6g}"


def agreement(got: torch.Tensor, want: torch.Tensor) -> Agreement:
    """``got`` (the export's embeddings) measured against ``want`` (torch's), in float64."""
    if got.shape != want.shape or got.ndim != 2:
        return Agreement(math.inf, -math.inf, math.inf, math.nan)
    got, want = got.double(), want.double()
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return Agreement(math.inf, -math.inf, math.inf, math.nan)
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    relative = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    norms = got.norm(dim=1) * want.norm(dim=1)
    dots = (got * want).sum(dim=1)
    # Identical rows have cosine 1 (not 1 - 1 ulp); a zero row has no direction, so it agrees
    # only with an identical one.
    same = (got == want).all(dim=1)
    cos = (dots / norms.clamp_min(1e-300)).clamp(-1.0, 1.0)
    cos = torch.where(same, 1.0, torch.where(norms > 0, cos, 0.0))
    row = int(cos.argmin()) if cos.numel() else 0
    return Agreement(relative, float(cos[row]) if cos.numel() else 1.0, diff, scale, row)


def failures(a: Agreement, rtol: float, min_cosine: float, atol: float | None = None) -> list[str]:
    """The measures of ``a`` that miss their bound, each with its value and the bound."""
    if not math.isfinite(a.relative_error):
        return ["non-finite values (NaN or inf) in the output, or a shape unlike torch's"]
    out = []
    if not a.relative_error <= rtol:
        out.append(
            f"relative error {a.relative_error:.3g} > rtol {rtol:g} (max abs diff "
            f"{a.max_abs_diff:.3g} against a largest |embedding value| of {a.scale:.3g})"
        )
    if not a.min_cosine >= min_cosine:
        out.append(
            f"worst cosine {cosine_text(a.min_cosine)} < min-cosine {min_cosine:.10g} "
            f"(embedding {a.worst_row} of the batch)"
        )
    if atol is not None and not a.max_abs_diff <= atol:
        out.append(f"max abs diff {a.max_abs_diff:.3g} > atol {atol:g}")
    return out


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
    rtol: float = RTOL,
    min_cosine: float = MIN_COSINE,
    *,
    atol: float | None = None,
    opset: int | None = None,
    fresh: Callable[[], nn.Module] | None = None,
) -> Agreement:
    """Write ``model`` to ``output`` as ``fmt`` and return how closely the artifact follows it.

    ``model`` is put in fp32 eval mode (in place). The artifact is reloaded and compared with the
    torch model at every batch size in ``check_batches``: a relative error above ``rtol``, an
    embedding's cosine below ``min_cosine`` or (if given) a max abs diff above ``atol``, or a
    failure to run, raises a ``VerificationError`` naming the batch and the measure, and leaves
    ``output`` untouched; a model whose batch axis cannot be dynamic in ONNX raises
    ``ExportError``, of which that is a subclass. ``fresh`` builds an untrained backbone of the
    same architecture for the ``pt`` check (e.g. ``lambda: get_backbone("r50", 512)``); without
    it the check loads into a NaN-filled copy of ``model``, which still catches a missing
    weight. ``opset`` is the ONNX opset (default 18).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if not check_batches or any(int(b) < 1 for b in check_batches):
        raise ValueError(f"check_batches must be positive batch sizes, got {check_batches!r}")
    if not (rtol >= 0 and -1 <= min_cosine <= 1 and (atol is None or atol >= 0)):
        raise ValueError(
            f"rtol and atol must be >= 0 and min_cosine in [-1, 1], got rtol={rtol!r} "
            f"min_cosine={min_cosine!r} atol={atol!r}"
        )
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
            worst = Agreement.exact()
            for batch in check_batches:
                x = random_images(int(batch), image_size, seed=100 + int(batch))
                try:
                    got = loaded(x)
                except Exception as e:  # e.g. a reshape frozen at the trace's batch size
                    raise VerificationError(
                        f"{fmt} export of {type(model).__name__} fails verification at batch "
                        f"{batch}: it raised {type(e).__name__}: {str(e).strip()[:500]}"
                    ) from e
                want = model(x)
                if got.shape != want.shape:
                    failed = [f"output shape {tuple(got.shape)}, torch's {tuple(want.shape)}"]
                else:
                    measured = agreement(got, want)
                    failed = failures(measured, rtol, min_cosine, atol)
                if failed:
                    raise VerificationError(
                        f"{fmt} export of {type(model).__name__} fails verification at batch "
                        f"{batch}: " + "; ".join(failed)
                    )
                worst = worst.worse(measured)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return worst


def parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--rtol",
        type=float,
        default=RTOL,
        help=f"max relative error, max|export - torch| / max|torch| (default {RTOL:g})",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=MIN_COSINE,
        help=f"lowest cosine of an embedding with torch's (default {MIN_COSINE:.10g})",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="also bound the max abs diff (default: none; raw embeddings have no fixed scale)",
    )
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
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
        agreed = export(
            model,
            args.format,
            args.output,
            image_size=int(meta["image_size"]),
            check_batches=batches,
            rtol=args.rtol,
            min_cosine=args.min_cosine,
            atol=args.atol,
            opset=args.opset,
            fresh=fresh,
        )
    except ExportError as e:
        print(f"error: {e}; nothing written to {args.output}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(str(b) for b in batches)
    print(
        f"{meta['folder']} (step {meta['step']}, {meta['backbone']}) -> {args.output} "
        f"[{args.format}], verified at batch {sizes}: {agreed.text()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
