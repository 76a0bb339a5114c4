"""Run a function on W local gloo processes and collect each rank's return value.

Every multi-rank test goes through `run_distributed`, so process-group setup, port choice
and error propagation live in one place.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    # The result is on disk. Wait for the other ranks, then leave without running C++ static
    # destructors: a thread still joinable there (gloo, DALI, DeepSpeed) aborts the process
    # with "terminate called without an active exception" after the test already passed.
    with contextlib.suppress(Exception):
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return results by rank.

    `fn` must be a module-level function (it is pickled into spawned processes) and its
    return value must be `torch.save`-able. A failure on any rank re-raises here with that
    rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(
            _worker,
            args=(world_size, free_port(), fn, args, out_dir),
            nprocs=world_size,
            join=False,
        )
        try:
            ctx.join()
        except Exception as exc:
            errors = []
            for r in range(world_size):
                p = os.path.join(out_dir, f"rank{r}.pt")
                if os.path.exists(p):
                    res = torch.load(p, weights_only=False)
                    if not res["ok"]:
                        errors.append(f"--- rank {r} ---\n{res['error']}")
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors)) from exc
        results = []
        for r in range(world_size):
            res = torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            results.append(res["result"])
        return results
