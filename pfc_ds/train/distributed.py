"""Process-group setup through DeepSpeed, and the host resources it leaves behind.

On a CPU, DeepSpeed's communication backend maps one POSIX shared-memory segment per rank
(``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, about 66 MB) and never
unlinks it; every run gets a fresh port, so the segments pile up in RAM. Each rank unlinks its
own segment as soon as every rank has mapped all of them: the mappings stay valid until exit, and
nothing is left behind however the process ends (error, signal, even SIGKILL).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("pfc_ds.train")

SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "deepspeed_allreduce_buffer"


def init_distributed() -> tuple[int, int]:
    """Initialise (or adopt an initialised) process group through DeepSpeed; ``(rank, world)``."""
    use_venv_extension_cache()
    import deepspeed

    _note_first_compile()
    deepspeed.init_distributed(dist_init_required=not dist.is_initialized())
    rank, world = dist.get_rank(), dist.get_world_size()
    if _uses_shm_comm():
        dist.barrier()  # every rank has mapped every segment once initialize() returned
        release_shm_segment(rank)
    return rank, world


def release_shm_segment(rank: int) -> None:
    """Unlink this rank's own segment, named as DeepSpeed's ``shm.cpp`` names it (never
    another run's: the name holds our port)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (SHM_DIR / f"{_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


def use_venv_extension_cache() -> None:
    """Keep JIT-compiled DeepSpeed ops inside the venv (``<prefix>/torch_extensions``).

    The build is keyed by source paths, so a per-user cache recompiles whenever the venv moves;
    one cache per venv is built once, at install (``python -m pfc_ds.train.distributed``).
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def prebuild_ops() -> None:
    """Compile the CPU comm op now (a no-op on a GPU machine, which does not use it)."""
    use_venv_extension_cache()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
        print(f"built {builder.absolute_name()} in {os.environ['TORCH_EXTENSIONS_DIR']}")


def _uses_shm_comm() -> bool:
    from deepspeed.comm import comm  # the module: its ``cdb`` global is set at init

    return getattr(comm.cdb, "shm_comm_op", None) is not None


def _note_first_compile() -> None:
    """Say so when DeepSpeed is about to JIT-compile its CPU comm op (once per venv)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        from torch.utils.cpp_extension import _get_build_directory

        built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    except Exception:
        return
    if not any(built.glob("*.so")):
        log.info("compiling DeepSpeed's deepspeed_shm_comm op (once, about 30 s): %s", built)


if __name__ == "__main__":
    prebuild_ops()
