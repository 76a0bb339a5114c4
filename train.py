"""Train a face-recognition backbone with a Partial FC head on DeepSpeed.

    deepspeed train.py --deepspeed_config ds_configs/zero2_fp16.json --config configs/wf42m_pfc02_r100.yaml
    torchrun --nproc_per_node 2 train.py --config configs/demo_cpu.yaml --deepspeed_config ds_configs/cpu.json
    ./train.sh configs/demo_cpu.yaml        # picks the launcher, ranks and threads for you

Exit status: 0 done, 2 a bad config, data, checkpoint or network interface (one line), 3
training diverged, 75 a peer rank died, hung or could not connect (resume from the last
checkpoint), 143 stopped by SIGTERM/SIGINT after a checkpoint. Everything else lives in
pfc_ds.train; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import deepspeed

    from pfc_ds.train.cli import add_arguments

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    from pfc_ds.train.cli import config_from_args, setup_rank_logging

    setup_rank_logging(rank)
    from pfc_ds.train import USER_ERRORS, Trainer
    from pfc_ds.train.distributed import shutdown
    from pfc_ds.train.divergence import DivergenceError
    from pfc_ds.train.network import GlooInterfaceError
    from pfc_ds.train.peers import EXIT_CODE, PeerFailure

    try:
        cfg = config_from_args(args)
        trainer = Trainer(cfg, ds_config=args.deepspeed_config, resume=args.resume)
        trainer.fit(stop_at=args.max_steps)
    except GlooInterfaceError as exc:
        # The same verdict on every rank, but each node's log needs it: its first rank prints.
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except USER_ERRORS as exc:
        # The same bad key or file on every rank: one line from rank 0, no traceback.
        if rank == 0:
            print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except DivergenceError as exc:  # decided on every rank alike
        if rank == 0:
            print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        return 3
    except PeerFailure as exc:
        # A peer is dead or hung: one line from the lowest survivor, then out at once (a normal
        # interpreter exit may abort in gloo's destructors after a timed-out collective).
        if exc.report:
            print(f"train.py: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CODE)
    shutdown()
    return 143 if trainer.stopped_by_signal else 0


if __name__ == "__main__":
    sys.exit(main())
