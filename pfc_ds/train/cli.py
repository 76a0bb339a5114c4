"""``train.py``'s arguments, and the config check ``train.sh`` runs before it starts any rank.

A typo in a YAML key used to surface once per rank, after DeepSpeed's start-up, wrapped in the
launcher's own messages. ``python -m pfc_ds.train.cli ARGS`` reads the same arguments, builds the
config and the DeepSpeed JSON in one process without DeepSpeed, and prints one line on a problem.
"""

from __future__ import annotations

import argparse
import sys

from pfc_ds.train.config import Config, ConfigError, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.batch_size=64 (repeatable)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="stop after this optimizer step (the LR schedule still spans train.max_steps or "
        "train.epochs, so a later --resume continues the same curve)",
    )
    p.add_argument("--output", help="output folder (train.output)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in the output folder, if any "
        "(train.auto_resume: true does this without the flag, e.g. under torchrun --max-restarts)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output folder that holds a run (train.overwrite: true): its "
        "files are moved to OUTPUT/replaced/<time>/ first; without this, --resume or a new "
        "--output, such a folder is refused",
    )
    p.add_argument("--log-every", type=int, help="log every N optimizer steps (train.log_every)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def setup_rank_logging(rank: int) -> None:
    """Rank 0 logs at INFO, the others at WARNING; DeepSpeed's chatter and its per-step
    deprecation warnings (0.19.8's ZeRO calls torch's *_into_tensor collectives) stay out."""
    import logging
    import warnings

    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.output is not None:
        overrides.append(f"train.output={args.output}")
    if args.log_every is not None:
        overrides.append(f"train.log_every={args.log_every}")
    if getattr(args, "overwrite", False):
        overrides.append("train.overwrite=true")
    return load_config(args.config, overrides)


def check(argv: list[str], *, gpu: bool | None = None) -> str | None:
    """The first problem with these ``train.py`` arguments, or ``None``.

    ``gpu``: judge them for a machine with a GPU (True) or without (False); ``None``: this one.
    The GPU check's dry run asks for ``True`` on a CPU machine.
    """
    from pfc_ds.train.config import pipeline_config
    from pfc_ds.train.engine import build_ds_config

    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    p.add_argument("--deepspeed_config")
    args, _ = p.parse_known_args(argv)
    try:
        cfg = config_from_args(args)
        ds = build_ds_config(args.deepspeed_config or cfg.train.deepspeed, cfg, world_size=None)
        if cfg.data.source != "synthetic":
            pipeline_config(cfg.data)
    except (ConfigError, OSError) as exc:
        return str(exc)
    from pathlib import Path

    from pfc_ds.train.preflight import missing_package, reused_output, unwritable

    output = Path(cfg.train.output)
    for problem in (
        reused_output(output, cfg.train, resume=args.resume),  # before anything is written
        unwritable(output),
        missing_package("wandb", "train.wandb") if cfg.train.wandb else None,
    ):
        if problem is not None:
            return problem
    if ds.get("fp16", {}).get("enabled"):
        import torch

        if not (torch.cuda.is_available() if gpu is None else gpu):
            return (
                f"{args.deepspeed_config or cfg.train.deepspeed} enables fp16, which DeepSpeed "
                "does not run on a CPU; use a bf16 or fp32 config there (ds_configs/cpu_bf16.json, "
                "zero{0,1,2,3}_bf16.json, cpu.json, zero{0,1,2,3}_fp32.json)"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    problem = check(sys.argv[1:] if argv is None else argv)
    if problem is not None:
        print(f"train.sh: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
