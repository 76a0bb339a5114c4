"""Write a training checkpoint's backbone as one plain fp32 ``state_dict`` file.

    python -m pfc_ds.tools.backbone OUTPUT_OR_TAG --output backbone.pt

``OUTPUT_OR_TAG`` is a training output folder (its newest complete checkpoint is used) or one
tag folder (``OUTPUT/checkpoints/step00001000``). Any ZeRO stage, world size and precision gives
the fp32 master weights, through DeepSpeed's own consolidation under ZeRO 1-3. The file loads
with ``strict=True`` into the backbone named in the checkpoint, which is checked before it is
written, and into insightface's classes of the same name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pfc_ds.checkpoint import load_backbone
from pfc_ds.checkpoint.shard_files import atomic_save


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pfc_ds.tools.backbone",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="training output folder or checkpoint tag folder")
    p.add_argument("--output", required=True, help="file to write (torch.save of a state_dict)")
    args = p.parse_args(argv)
    try:
        model, ref = load_backbone(args.src)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_save(model.state_dict(), Path(args.output))
    print(f"{ref.folder} (step {ref.step}, {ref.meta['backbone']}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
