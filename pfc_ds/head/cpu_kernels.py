"""The head's compiled CPU kernels: built once per venv where a C++ compiler is present.

Two jobs need them, both on the CPU only (CUDA runs eager ops): ``SparseSGD``'s row update
(``row_kernels``, ``csrc/row_sgd.cpp``) and the streamed margin softmax's per-chunk passes
(``margin_softmax``, ``csrc/margin_softmax.cpp``). One extension holds both, so one build
serves them; ``csrc/bindings.cpp`` names what Python sees.

It is compiled once per venv (``python -m pfc_ds.train.distributed``, the Makefile's setup
step, builds it beside DeepSpeed's CPU comm op; under a minute) into
``<venv>/torch_extensions``; a process that finds it missing builds it on first use. Where it
cannot be built or loaded (no compiler, a read-only venv) or ``PFC_DS_CPU_KERNELS=eager`` is
set, both callers run their eager ops, with one log line saying why.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

NAME = "pfc_ds_head_kernels"
_CSRC = Path(__file__).with_name("csrc")
SOURCES = [_CSRC / "bindings.cpp", _CSRC / "row_sgd.cpp", _CSRC / "margin_softmax.cpp"]
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]  # no -march=native: a venv may move hosts
ENV = "PFC_DS_CPU_KERNELS"

_loaded: ModuleType | None = None
_tried = False


def build_directory() -> Path:
    """Where the compiled kernels live: ``$TORCH_EXTENSIONS_DIR`` or ``<venv>/torch_extensions``
    (one build per venv, as for DeepSpeed's CPU comm op)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(sys.prefix) / "torch_extensions")
    return Path(root) / NAME


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernels (built on first use if need be), or ``None`` where they cannot be
    had; tried once per process."""
    global _loaded, _tried
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get(ENV, "").lower() == "eager":
        log.info("%s=eager: the head's CPU kernels are off, eager ops run", ENV)
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension

        out = build_directory()
        out.mkdir(parents=True, exist_ok=True)
        _loaded = load_extension(
            NAME,
            [str(s) for s in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(_CSRC)],
            build_directory=str(out),
            verbose=verbose,
        )
    except Exception as e:  # no compiler, no ninja, a read-only venv: the eager ops work
        log.warning(
            "the head's CPU kernels are not available (%s: %s); eager ops run instead",
            type(e).__name__,
            str(e).strip().splitlines()[-1] if str(e).strip() else "",
        )
        _loaded = None
    return _loaded


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels can take these tensors: all on the CPU, and built."""
    return all(t.device.type == "cpu" for t in tensors) and load() is not None
