"""Collection where DALI does not import (the lent GPU machine: its wheel is too big to carry).

The data tests that build DALI pipelines import ``nvidia.dali`` at module level; without it
pytest would stop at collection and run nothing. They are left out instead, and the header of
the run says which and why, so a GPU run of ``-m gpu`` never silently looks like a full one.
"""

from __future__ import annotations

import importlib.util

import pytest

DALI_TEST_FILES = [
    "test_data_check_pack.py",
    "test_data_index.py",
    "test_data_loader.py",
    "test_data_sizes.py",
    "test_data_slow.py",
]


def _dali_missing() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is None
    except ModuleNotFoundError:  # no nvidia namespace at all
        return True


collect_ignore = DALI_TEST_FILES if _dali_missing() else []


def pytest_report_header(config) -> str | None:
    if collect_ignore:
        return f"nvidia.dali does not import: not collected: {', '.join(collect_ignore)}"
    return None


@pytest.fixture(params=["kernels", "eager"])
def head_ops(request, monkeypatch):
    """Runs a test twice: with the head's compiled CPU kernels and with the eager ops that a GPU
    runs (``PFC_DS_CPU_KERNELS=eager`` also reaches the ranks a test spawns), so the path no
    CPU would otherwise take stays checked against the same references."""
    from pfc_ds.head import cpu_kernels

    if request.param == "eager":
        monkeypatch.setenv(cpu_kernels.ENV, "eager")
        monkeypatch.setattr(cpu_kernels, "usable", lambda *tensors: False)
    elif cpu_kernels.load() is None:
        pytest.skip("no C++ compiler: the eager ops are the only ones")
    return request.param
