"""Verification accuracy of a training checkpoint on insightface ``.bin`` sets.

    python -m pfc_ds.eval --checkpoint OUTPUT_OR_TAG --bin lfw.bin [--bin cfp_fp.bin ...]

Prints ``NAME: accuracy A ± S, threshold T, TAR@FAR=1e-3 V`` per set (NAME = the file stem), by
insightface's 10-fold protocol on flip-summed embeddings (``pfc_ds.eval.verification``); ``T`` is
the mean chosen squared-L2 distance threshold. A missing file or a bad ``.bin`` is one
``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pfc_ds.eval.bins import load_bin, read_bin
from pfc_ds.eval.embedder import evaluate_bin, load_checkpoint_model
from pfc_ds.eval.verification import VerificationResult


def format_result(name: str, r: VerificationResult) -> str:
    """The one-line report of a set."""
    return (
        f"{name}: accuracy {r.accuracy:.4f} ± {r.accuracy_std:.4f}, "
        f"threshold {r.threshold:.3f}, TAR@FAR={r.far:.0e} {r.tar_at_far:.4f}"
    ).replace("e-03", "e-3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="training output folder or tag folder")
    p.add_argument(
        "--bin", action="append", required=True, type=Path, help="a .bin set (repeatable)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument("--no-flip", action="store_true", help="embed without the mirrored image")
    args = p.parse_args(argv)
    try:
        for path in args.bin:
            read_bin(path)  # a missing or malformed set fails before the model loads
        model, image_size, meta = load_checkpoint_model(args.checkpoint, args.device)
        about = ", ".join(f"{k} {meta[k]}" for k in ("backbone", "step") if k in meta)
        where = meta.get("folder", args.checkpoint)
        print(f"{where}: {about + ', ' if about else ''}{image_size} px input", file=sys.stderr)
        for path in args.bin:
            data = load_bin(path, image_size)
            result = evaluate_bin(
                model,
                data,
                args.batch_size,
                args.device,
                args.nfolds,
                flip=not args.no_flip,
                progress=None,
            )
            print(format_result(data.name, result), flush=True)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
