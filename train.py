"""Train a face-recognition backbone with a Partial FC head on DeepSpeed.

    deepspeed train.py --deepspeed_config ds_configs/zero2_fp16.json --config configs/wf42m_pfc02_r100.yaml
    torchrun --nproc_per_node 2 train.py --config configs/demo_cpu.yaml --deepspeed_config ds_configs/cpu.json
    ./train.sh configs/demo_cpu.yaml        # picks the launcher, ranks and threads for you

Everything else lives in pfc_ds.train; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import deepspeed

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.batch_size=64 (repeatable)",
    )
    p.add_argument("--max-steps", type=int, help="optimizer steps to train (train.max_steps)")
    p.add_argument("--output", help="output folder (train.output)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the output folder, if any",
    )
    p.add_argument("--log-every", type=int, help="log every N optimizer steps (train.log_every)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19.8's ZeRO calls torch's deprecated *_into_tensor collectives every step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed")

    from pfc_ds.train import Trainer, load_config

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.output is not None:
        overrides.append(f"train.output={args.output}")
    if args.log_every is not None:
        overrides.append(f"train.log_every={args.log_every}")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg, ds_config=args.deepspeed_config, resume=args.resume)
    trainer.fit()
    return 143 if trainer.stopped_by_signal else 0


if __name__ == "__main__":
    sys.exit(main())
