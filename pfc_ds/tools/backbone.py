"""Write a training checkpoint's backbone as one plain fp32 ``state_dict`` file.

    python -m pfc_ds.tools.backbone OUTPUT_OR_TAG --output backbone.pt

``OUTPUT_OR_TAG`` is a training output folder (its ``latest`` checkpoint is used) or one tag
folder (``OUTPUT/checkpoints/step00001000``). Any ZeRO stage, world size and precision gives the
fp32 master weights, through DeepSpeed's own consolidation under ZeRO 1-3 (the library
function; its ``zero_to_fp32.py`` script would also need ``huggingface_hub``). The file loads with
``strict=True`` into the backbone named in the checkpoint, which is checked before it is written,
and into insightface's classes of the same name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pfc_ds.train import checkpoint as ckpt
from pfc_ds.train.shard_files import atomic_save


def find_checkpoint(src: str | Path) -> tuple[Path, dict]:
    """The tag folder and meta of ``src``: a tag folder, or an output folder's latest tag."""
    src = Path(src)
    if (src / ckpt.META).is_file():
        return src, json.loads((src / ckpt.META).read_text())
    found = ckpt.find_latest(src)
    if found is None:
        raise FileNotFoundError(f"{src} holds no complete checkpoint (no {ckpt.META})")
    return found


def load_backbone(src: str | Path) -> tuple[torch.nn.Module, dict]:
    """The fp32 backbone of a checkpoint (any ZeRO stage), loaded strictly, in eval mode, with
    the checkpoint's meta (``backbone``, ``embedding_size``, ``image_size``, ``step``...)."""
    from pfc_ds.backbones import get_backbone

    folder, meta = find_checkpoint(src)
    state = ckpt.consolidated_backbone(folder, meta)
    model = get_backbone(
        meta["backbone"], meta["embedding_size"], **meta.get("backbone_options", {})
    )
    model.load_state_dict(state, strict=True)
    return model.float().eval(), dict(meta, folder=str(folder))


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
        model, meta = load_backbone(args.src)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_save(model.state_dict(), Path(args.output))
    print(f"{meta['folder']} (step {meta['step']}, {meta['backbone']}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
