"""Synthetic identities: ``python -m data_pipelines.synth OUT_PREFIX --ids 1000 --per-id 20``.

The command line of ``data_pipelines.faces`` (the generator: face-like identities a model can
learn, with real JPEG decode cost and no download).

Label noise for robustness experiments (``data_pipelines.noise`` has the exact rules):
``--conflict P`` splits a fraction P of identities under two labels, ``--flip P`` gives exactly
``round(P * images)`` images a wrong label, ``--long-tail ALPHA`` gives identity ``i``
``max(2, floor(per_id * (i + 1) ** -ALPHA + 0.5))`` images. A noisy set also gets
``OUT_PREFIX_conflicts.csv``, ``OUT_PREFIX_flips.csv``, ``OUT_PREFIX_noise.json`` and a clean
held-out ``OUT_PREFIX_heldout.bin`` of identities it never shows
(``data_pipelines.faces.heldout_pairs``).
"""

from __future__ import annotations

import argparse

from .faces import generate, write_sidecars


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipelines.synth", description=__doc__.splitlines()[0]
    )
    ap.add_argument("out_prefix", help="writes OUT_PREFIX.rec, OUT_PREFIX.idx and a property file")
    ap.add_argument("--ids", type=int, default=1000)
    ap.add_argument(
        "--per-id", type=int, default=20, help="images per identity (--long-tail: the head's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument(
        "--sorted", action="store_true", help="group images by identity (insightface order)"
    )
    ap.add_argument(
        "--conflict", type=float, default=0.0, metavar="P",
        help="split this fraction of identities under two labels (inter-class conflict)",
    )  # fmt: skip
    ap.add_argument(
        "--flip", type=float, default=0.0, metavar="P",
        help="give exactly round(P * images) images a random wrong label",
    )  # fmt: skip
    ap.add_argument(
        "--long-tail", type=float, default=0.0, metavar="ALPHA",
        help="identity i gets max(2, floor(per_id * (i + 1) ** -ALPHA + 0.5)) images",
    )  # fmt: skip
    ap.add_argument(
        "--heldout-pairs", type=int, default=None, metavar="N",
        help="write OUT_PREFIX_heldout.bin with N clean pairs of unseen identities "
        "(default: 3000 with a noise option, else none)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    noisy = bool(a.conflict or a.flip or a.long_tail)
    pairs = a.heldout_pairs if a.heldout_pairs is not None else (3000 if noisy else 0)
    try:
        plan = generate(
            a.out_prefix,
            a.ids,
            a.per_id,
            seed=a.seed,
            workers=a.workers,
            shuffle=not a.sorted,
            progress=True,
            conflict=a.conflict,
            flip=a.flip,
            long_tail=a.long_tail,
        )
    except ValueError as exc:
        ap.error(str(exc))
    print(
        f"wrote {plan.num_images} images of {a.ids} identities under {plan.num_labels} labels "
        f"to {a.out_prefix}.rec"
    )
    if noisy or pairs:
        for path in write_sidecars(a.out_prefix, plan, seed=a.seed, heldout=pairs):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
