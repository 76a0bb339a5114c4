"""The node-shared index cache: one builder under a file lock, others wait and map; a build
killed midway leaves nothing a later run trusts. Separate processes stand in for ranks (and for
nodes: they take the same ``lockf`` lock on the same file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.cache import open_index, table_name
from data_pipelines.table import open_table
from tests.test_data_table import _same_as_reference, write_layout

REPO = Path(__file__).resolve().parents[1]

# Each child: hold at POINT (announcing it) until RELEASE exists, then go on; GO starts all.
_CHILD = r"""
import json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import data_pipelines.cache as cache
from data_pipelines.table import TableWriter
prefix, root, marks, point = sys.argv[1:5]
owner, name = (TableWriter, "finish") if point == "columns" else (cache, "publish")
real = getattr(owner, name)

def held(*args, **kw):
    Path(marks, f"built-{os.getpid()}").write_text("")
    while not Path(marks, "RELEASE").exists():
        time.sleep(0.02)
    return real(*args, **kw)

setattr(owner, name, held)
Path(marks, f"ready-{os.getpid()}").write_text("")
while not Path(marks, "GO").exists():
    time.sleep(0.02)
scan = cache.open_index(prefix, root)
print(json.dumps({"table": scan.table_dir, "n": scan.num_images, "layout": scan.layout}))
"""


def _spawn(prefix: Path, root: Path, marks: Path, point: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(prefix), str(root), str(marks), point],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("point", ["columns", "publish"])
def test_a_killed_build_leaves_no_table_a_later_run_uses(tmp_path: Path, point: str) -> None:
    """Killed with its columns written but no ``meta.json`` (``columns``), or whole but not yet
    renamed (``publish``): only a temporary directory is left, which nothing opens and the next
    builder deletes before building the table again."""
    prefix = tmp_path / "data" / "train"
    write_layout(prefix, [3, 2, 4])
    root, marks = tmp_path / "cache", tmp_path / "marks"
    marks.mkdir()
    (marks / "GO").write_text("")
    child = _spawn(prefix, root, marks, point, tmp_path / "child.log")
    _wait(lambda: any(marks.glob("built-*")), "the child's build")
    child.send_signal(signal.SIGKILL)
    child.wait()
    final = root / table_name(str(prefix), full=False)
    left = sorted(p.name for p in root.iterdir())
    assert left == [f".{final.name}.tmp-{os.uname().nodename}-{child.pid}", f"{final.name}.lock"]
    assert not final.exists() and open_table(final, f"{prefix}.rec") is None
    scan = open_index(prefix, root)
    assert scan.table_dir == str(final)
    _same_as_reference(scan, prefix)
    assert sorted(p.name for p in root.iterdir()) == [final.name, f"{final.name}.lock"]


def test_concurrent_openers_build_once_and_map_the_same_table(tmp_path: Path) -> None:
    prefix = tmp_path / "data" / "train"
    write_layout(prefix, [3, 2, 4, 1])
    root, marks = tmp_path / "cache", tmp_path / "marks"
    marks.mkdir()
    logs = [tmp_path / f"rank{r}.log" for r in range(3)]
    ranks = [_spawn(prefix, root, marks, "columns", log) for log in logs]
    _wait(lambda: len(list(marks.glob("ready-*"))) == 3, "all ranks to start")
    (marks / "GO").write_text("")
    _wait(lambda: any(marks.glob("built-*")), "one build")
    # the builder holds the lock until RELEASE: the two others must be waiting on it
    _wait(lambda: sum("waiting for" in log.read_text() for log in logs) == 2, "two waiting ranks")
    (marks / "RELEASE").write_text("")
    out = [json.loads(r.communicate(timeout=120)[0]) for r in ranks]
    assert all(r.returncode == 0 for r in ranks)
    assert len(list(marks.glob("built-*"))) == 1  # one build, by one rank
    assert len({o["table"] for o in out}) == 1 and {o["n"] for o in out} == {10}
    builder = int(next(marks.glob("built-*")).name.split("-")[1])
    waiting = [log.read_text() for log in logs if "waiting for" in log.read_text()]
    assert all(f"pid {builder} to build the index of {prefix}.rec" in w for w in waiting)


def test_warm_opens_share_the_mapped_files(tmp_path: Path) -> None:
    prefix = tmp_path / "train"
    labels = write_layout(prefix, [5, 5])
    a = open_index(prefix, tmp_path / "cache")
    b = open_index(prefix, tmp_path / "cache")
    assert a.table_dir == b.table_dir
    for scan in (a, b):
        assert isinstance(scan.labels, np.memmap) and not scan.labels.flags.writeable
        assert str(scan.labels.filename) == str(Path(a.table_dir) / "labels.bin")
    np.testing.assert_array_equal(a.labels, labels)
