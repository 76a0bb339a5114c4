"""Process-group setup through DeepSpeed, and the host resources it leaves behind.

On a CPU, DeepSpeed's communication backend maps one POSIX shared-memory segment per rank
(``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, about 66 MB) and never
unlinks it; every run gets a fresh port, so the segments pile up in RAM. Each rank unlinks its
own segment as soon as every rank has mapped all of them: the mappings stay valid until exit, and
nothing is left behind however the process ends (error, signal, even SIGKILL).

Every process group gets ``train.collective_timeout_s`` (``peers.group_timeout``): the default
one when it is made, the groups DeepSpeed clones later (ZeRO's data-parallel group) through
torch's default, which would otherwise be 30 minutes for gloo. A gloo group pfc_ds opens itself
(the default one on CPU, the side group next to NCCL) first agrees on its network interface and
connects under ``train.connect_timeout_s`` (``network``), then gets the collective timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pfc_ds.train import network
from pfc_ds.train.network import CONNECT_TIMEOUT_S
from pfc_ds.train.peers import group_timeout

if TYPE_CHECKING:
    from pfc_ds.train.faults import Faults

log = logging.getLogger("pfc_ds.train")

SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "deepspeed_allreduce_buffer"


def init_distributed(
    timeout_s: float | None = None,
    *,
    connect_timeout_s: float | None = None,
    faults: Faults | None = None,
) -> tuple[int, int]:
    """Initialise (or adopt an initialised) process group through DeepSpeed; ``(rank, world)``.

    ``timeout_s``: how long a collective waits for a peer before it fails (every group, gloo and
    NCCL). ``None`` keeps DeepSpeed's default. ``connect_timeout_s``: how long a gloo group may
    take to connect once every rank has arrived (``network``; default 30 s, at most
    ``timeout_s``). ``faults``: the ``gloo_loopback`` test fault.
    """
    use_venv_extension_cache()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _note_first_compile()
    backend = get_accelerator().communication_backend_name()
    kwargs = {}
    if timeout_s is not None:
        timeout = group_timeout(backend, timeout_s)
        # NCCL's asynchronous error handling stays torch's default (3: tear the process down
        # on a timed-out collective), which the dead-peer handling relies on.
        set_group_timeouts(timeout)
        kwargs["timeout"] = timeout
    # Before any group: torch reads GLOO_SOCKET_IFNAME when it builds a gloo group.
    network.choose_interface(force_source=faults.gloo_source() if faults else None)
    connect_s = connect_timeout_s if connect_timeout_s is not None else CONNECT_TIMEOUT_S
    _init_default_group(backend, kwargs.get("timeout"), connect_s)
    deepspeed.init_distributed(dist_init_required=not dist.is_initialized(), **kwargs)
    if timeout_s is not None:
        set_group_timeouts(kwargs["timeout"])  # our gloo group's connect timeout, or the caller's
    rank, world = dist.get_rank(), dist.get_world_size()
    if _uses_shm_comm():
        dist.barrier()  # every rank has mapped every segment once initialize() returned
        release_shm_segment(rank)
    return rank, world


_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _init_default_group(backend: str, timeout: timedelta | None, connect_s: float) -> None:
    """Create the default group ourselves: under torchrun in a per-attempt namespace of its
    store, and for gloo with the agreed interface and a connect timeout of its own.

    torchrun's agent keeps one TCPStore for all restarts (``--max-restarts``), and torch 2.13's
    ``env://`` rendezvous adds no per-attempt prefix (``rendezvous.py`` assumes a new store per
    retry). A restarted group then reads the dead attempt's gloo addresses: "Connection
    refused", or a hang when a port was reused (measured: 3 restarts in 4 failed). DeepSpeed
    adopts a group that exists, so we make it here, as torch would but under
    ``pfc_ds/attempt_<TORCHELASTIC_RESTART_COUNT>/``. Without torchrun's store (ranks started
    by hand or by another launcher) a gloo group gets the ``env://`` store torch itself would
    make; an NCCL one is left to DeepSpeed.
    """
    if dist.is_initialized() or not all(k in os.environ for k in _ENV):
        return
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not agent and backend != "gloo":
        return
    timeout = timeout or c10d_default_timeout()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if agent:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent_store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=False,
            timeout=timeout,
        )
        store = dist.PrefixStore(f"pfc_ds/attempt_{attempt}/", agent_store)
    else:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        store.set_timeout(timeout)
    if backend != "gloo":
        kwargs = {}
        if backend == "nccl" and world > 1:  # as DeepSpeed does: bind the device for NCCL
            kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs
        )
        return
    with network.Connecting(store, "default", rank, world, timeout, connect_s) as connect:
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=connect.connect_timeout
        )
    set_group_timeouts(timeout)  # connected: collectives get the full timeout


def shutdown() -> None:
    """Leave the process groups at a normal end of a run: every rank meets at a barrier, then
    destroys its groups. A rank that simply exits while its gloo pairs' threads are still
    joinable can abort at interpreter exit ("terminate called without an active exception",
    exit -6) after its work is done; seen about once in eight plain two-rank exits here."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):  # a peer already gone: nothing left to agree on
        dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def env_rank() -> int:
    """This process's global rank as the launcher set it (before any group exists)."""
    return int(os.environ.get("RANK", "0"))


def control_group(timeout_s: float, connect_timeout_s: float = CONNECT_TIMEOUT_S):
    """The group for host-side agreement (stop requests, file lists, checks): the default group
    under gloo, a gloo side group next to NCCL, so it never waits for the GPU's queued work."""
    if dist.get_backend() == "gloo":
        return None
    return gloo_side_group(timeout_s, connect_timeout_s)


def gloo_side_group(timeout_s: float, connect_timeout_s: float = CONNECT_TIMEOUT_S):
    """A gloo group of every rank next to the default one, connected as the default gloo group
    is (``network``): the interface agreed through the default store, a connect timeout of its
    own, then ``timeout_s`` for its collectives."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    with network.Connecting(store, "control", rank, world, timeout, connect_timeout_s) as connect:
        group = dist.new_group(backend="gloo", timeout=connect.connect_timeout)
    dist.distributed_c10d._set_pg_timeout(timeout, group)
    return group


def compute_device() -> torch.device:
    """This rank's device, as DeepSpeed's engine will pick it (``cuda:LOCAL_RANK`` or cpu), so
    the data can be built before the engine."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def c10d_default_timeout() -> timedelta:
    from torch.distributed import distributed_c10d as c10d

    return c10d.default_pg_timeout


def set_group_timeouts(timeout: timedelta) -> None:
    """``timeout`` for every existing process group and, as torch's default, for later ones.

    ``new_group(timeout=None)`` reads ``distributed_c10d.default_pg_timeout`` (and the NCCL one)
    when called, and DeepSpeed clones the world group that way; setting both module defaults is
    the one hook torch offers for groups created inside DeepSpeed.
    """
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    if dist.is_initialized():
        for group in list(c10d._world.pg_map):
            with contextlib.suppress(ValueError, AssertionError):
                c10d._set_pg_timeout(timeout, group)


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
    """Compile the CPU comm op (a no-op on a GPU machine, which does not use it) and the head's
    CPU kernels now, not in a run's first step."""
    use_venv_extension_cache()
    from deepspeed.accelerator import get_accelerator

    from pfc_ds.head import cpu_kernels

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
        print(f"built {builder.absolute_name()} in {os.environ['TORCH_EXTENSIONS_DIR']}")
    if cpu_kernels.load() is not None:
        print(f"built {cpu_kernels.NAME} in {cpu_kernels.build_directory()}")
    else:
        print("the head's CPU kernels could not be built: the head runs eager ops")


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
