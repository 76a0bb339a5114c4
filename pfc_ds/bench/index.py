"""Index memory at WebFace42M scale: ``python -m pfc_ds.bench.index`` (-> BENCHMARKS.md).

Writes an insightface-layout ``.rec``/``.idx`` of ``--records`` image records over
``--identities`` identities (42M over 2M by default: header record, images with 4-byte
payloads, identity records with float32 key ranges as insightface writes them; vectorised, so
it takes about a minute and 2.5 GB of disk), then opens it through the ``rec`` source
(``sources.open_dataset``) from 1, 2 and 4 rank processes at once, cold (no index cache; the
``.rec`` and ``.idx`` evicted from the page cache with ``posix_fadvise``) and warm. Each rank
then cuts its epoch-0 shard plan and reads its samples' labels and offsets as the feeder does
over an epoch. Per rank it reports the open and plan times, peak RSS (``VmHWM``) and, while all
ranks still hold their maps, proportional memory (``Pss`` of ``/proc/self/smaps_rollup``), so
a table the ranks share shows as one copy split between them. The rank processes import only
numpy and ``data_pipelines`` (no torch): the numbers are the index's and the interpreter's.

The cold table is checked against the writer's own keys, offsets and labels, chunk by chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

_CHUNK = 1 << 20  # records per write step
_LINES = 1 << 16  # .idx lines per formatting step
_RANKS = (1, 2, 4)
_PAYLOAD = b"\xff\xd8\xff\xd9"  # a tiny stand-in for a JPEG (SOI, EOI)
_IMAGE = np.dtype(
    [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
     ("id", "<u8"), ("id2", "<u8"), ("jpeg", "V4")]
)  # fmt: skip
_RANGE = np.dtype(
    [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
     ("id", "<u8"), ("id2", "<u8"), ("lo", "<f4"), ("hi", "<f4")]
)  # fmt: skip


# -- the test file ---------------------------------------------------------------------------
def identity_starts(records: int, identities: int, seed: int = 0) -> np.ndarray:
    """First image key of each identity (keys 1..records): random sizes >= 1, mean N / C."""
    cuts = np.random.default_rng(seed).choice(records - 1, identities - 1, replace=False) + 1
    return 1 + np.r_[0, np.sort(cuts)].astype(np.int64)


def image_offset(keys: np.ndarray) -> np.ndarray:
    """Byte offsets of image keys (header record first, 40 bytes; then 36 per image)."""
    return _RANGE.itemsize + _IMAGE.itemsize * (keys - 1)


def write_test_file(prefix: str, records: int, identities: int, seed: int = 0) -> None:
    """insightface layout written with numpy, chunk by chunk (memory: a chunk, not the file)."""
    from data_pipelines.insightface import write_property
    from data_pipelines.recordio import IR_SIZE, MAGIC, format_index

    starts = identity_starts(records, identities, seed)
    first_id = records + 1
    total = first_id + identities

    def ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        out = np.zeros(lo.size, _RANGE)
        out["magic"], out["lrec"], out["flag"] = MAGIC, IR_SIZE + 8, 2
        out["lo"], out["hi"] = lo.astype(np.float32), hi.astype(np.float32)  # as struct "<f"
        return out

    with open(prefix + ".rec", "wb") as rec, open(prefix + ".idx", "wb") as idx:
        ranges(np.array([first_id]), np.array([total])).tofile(rec)
        for k0 in range(1, first_id, _CHUNK):
            keys = np.arange(k0, min(first_id, k0 + _CHUNK))
            out = np.zeros(keys.size, _IMAGE)
            out["magic"], out["lrec"] = MAGIC, IR_SIZE + len(_PAYLOAD)
            out["label"] = np.searchsorted(starts, keys, side="right") - 1
            out["jpeg"] = np.void(_PAYLOAD)
            out.tofile(rec)
        ends = np.r_[starts[1:], first_id]
        for c0 in range(0, identities, _CHUNK):
            ranges(starts[c0 : c0 + _CHUNK], ends[c0 : c0 + _CHUNK]).tofile(rec)
        ident_base = int(image_offset(np.array([first_id]))[0])
        for k0 in range(0, total, _LINES):
            keys = np.arange(k0, min(total, k0 + _LINES))
            offs = np.where(
                keys < first_id,
                image_offset(np.maximum(keys, 1)),
                ident_base + _RANGE.itemsize * (keys - first_id),
            )
            offs[keys == 0] = 0
            idx.write(format_index(keys, offs))
    write_property(prefix, identities, (112, 112))


def verify(scan, records: int, identities: int, seed: int = 0) -> str:
    """Compare a table with the writer's keys, offsets and labels, chunk by chunk."""
    starts = identity_starts(records, identities, seed)
    if scan.num_images != records:
        raise AssertionError(f"table holds {scan.num_images} images, the file {records}")
    for lo in range(0, records, _CHUNK):
        keys = np.arange(lo + 1, min(records, lo + _CHUNK) + 1)
        labels = np.searchsorted(starts, keys, side="right") - 1
        for name, want in (("keys", keys), ("offsets", image_offset(keys)), ("labels", labels)):
            got = np.asarray(getattr(scan, name)[lo : lo + keys.size])
            if not np.array_equal(got, want):
                j = int(np.flatnonzero(got != want)[0])
                raise AssertionError(f"{name}[{lo + j}] is {got[j]}, the writer's {want[j]}")
    return f"all {records:,} keys, offsets and labels equal the writer's"


# -- one rank --------------------------------------------------------------------------------
def rank_main(prefix: str, cache: str, rank: int, world: int, batch: int) -> None:
    """Open as a training rank does, cut the plan, read an epoch's table entries; report."""
    from data_pipelines.config import DataConfig
    from data_pipelines.sampler import ShardPlan
    from data_pipelines.sources import open_dataset

    t0 = time.perf_counter()
    ds = open_dataset(DataConfig(path=prefix, cache_dir=cache, num_threads=1))
    t1 = time.perf_counter()
    indices, _ = ShardPlan(ds.num_images, batch, rank, world, seed=0).rank_batches(0, 0)
    t2 = time.perf_counter()
    total = 0
    for lo in range(0, indices.shape[0], 512):  # as the feeder reads them, a few batches at a time
        rows = indices[lo : lo + 512]
        total += int(ds.labels[rows].sum()) + int(ds.scan.offsets[rows][:, 0].sum() % 7)
    t3 = time.perf_counter()
    print(json.dumps({
        "rank": rank, "open_s": t1 - t0, "plan_s": t2 - t1, "read_s": t3 - t2,
        "layout": ds.scan.layout, "records_read": ds.scan.records_read,
        "images": ds.num_images, "plan_bytes": indices.nbytes, "check": total,
    }), flush=True)  # fmt: skip
    sys.stdin.readline()  # every rank holds its maps until all are measured:
    print(json.dumps({"rank": rank, **memory()}), flush=True)
    sys.stdin.readline()  # a rank that left early would raise the others' share of the pages


def tool_main(what: str, prefix: str) -> None:
    """One of the tools over the file in this fresh process; report its time and peak RSS.

    ``scan``: the per-record scan that header-less layouts and ``check --full`` run (without
    ``--full``'s decode of every image: this file's payloads are not JPEGs). ``check``:
    ``python -m data_pipelines.check PREFIX`` (the layout index and 1000 sampled decodes).
    """
    t0 = time.perf_counter()
    if what == "scan":
        from data_pipelines.cache import build_table

        with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
            build_table(prefix, Path(tmp) / "table", full=True)
    else:
        import contextlib
        import io

        from data_pipelines import check

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            check.main([prefix, "--workers", "1"])
    print(json.dumps({"tool": what, "s": time.perf_counter() - t0, **memory()}), flush=True)


def run_tool(what: str, prefix: str, log: Path) -> dict:
    cmd = [sys.executable, "-m", "pfc_ds.bench.index", "--tool-worker", what, prefix]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{what} failed; see {log}")
    return json.loads(done.stdout.splitlines()[-1])


def memory() -> dict[str, int]:
    """Bytes: peak and current RSS, and PSS (with its anonymous and file parts)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name = line.split(":")[0]
        if name in ("Pss", "Pss_Anon", "Pss_File"):
            out[name] = int(line.split()[1]) * 1024
    return out


# -- the parent ------------------------------------------------------------------------------
def evict(paths: list[str]) -> None:
    """Drop the files' pages from the page cache (clean pages, no privileges needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_ranks(prefix: str, cache: str, world: int, batch: int, log: Path) -> list[dict]:
    """``world`` rank processes started together; their reports merged per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pfc_ds.bench.index", "--rank-worker"]
    with log.open("a") as err:
        procs = [
            subprocess.Popen(
                [*cmd, prefix, cache, str(r), str(world), str(batch)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
            for r in range(world)
        ]
        ready = [json.loads(p.stdout.readline() or "{}") for p in procs]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        measured = [json.loads(p.stdout.readline() or "{}") for p in procs]
        for p in procs:
            p.stdin.write("bye\n")
            p.stdin.flush()
        for p in procs:
            p.wait(timeout=600)
    if any(p.returncode for p in procs) or not all(ready) or not all(measured):
        raise RuntimeError(f"a rank failed; see {log}")
    return [{**a, **b} for a, b in zip(ready, measured, strict=True)]


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def table(results: dict, args: argparse.Namespace, notes: dict) -> str:
    lines = [
        "| ranks | cache | open s (max) | plan s (max) | peak RSS GB per rank (max) "
        "| PSS GB per rank (mean) | PSS GB, all ranks |",
        "|---|---|---|---|---|---|---|",
    ]
    for (world, state), ranks in results.items():
        pss = [r["Pss"] for r in ranks]
        lines.append(
            f"| {world} | {state} | {max(r['open_s'] for r in ranks):.1f} "
            f"| {max(r['plan_s'] for r in ranks):.1f} | {_gb(max(r['VmHWM'] for r in ranks))} "
            f"| {_gb(sum(pss) / len(pss))} | {_gb(sum(pss))} |"
        )
    peak = max(r["VmHWM"] for ranks in results.values() for r in ranks)
    one = sum(r["Pss"] for r in results[(1, "warm")])
    four = sum(r["Pss"] for r in results[(max(_RANKS), "warm")])
    rss_ok = "met" if peak <= 2e9 else "NOT met"
    pss_ok = "met" if four <= 1.5 * one else "NOT met"
    cold = results[(1, "cold")][0]
    cmd = "python -m pfc_ds.bench.index" + (
        "" if (args.records, args.identities) == (42_000_000, 2_000_000)
        else f" --records {args.records} --identities {args.identities}"
    )  # fmt: skip
    return "\n".join(
        [
            "### Index memory at WebFace42M scale (`python -m pfc_ds.bench.index`)",
            "",
            f"Machine: {notes['machine']}. Measured {notes['when']} UTC; 1-minute load average "
            f"{notes['load'][0]:.1f}–{notes['load'][1]:.1f} during the run (2 cores shared with "
            f"other sessions: times vary with it), {notes['avail']:.0f} GiB available at the start.",
            "",
            f"Command: `{cmd}`. Data: {args.records:,} image records over {args.identities:,} "
            f"identities in insightface's layout (header, images with 4-byte payloads, identity "
            f"records with float32 key ranges), {notes['rec_gb']} GB `.rec` + {notes['idx_gb']} GB "
            f"`.idx`, written in {notes['write_s']:.0f} s. Each rank: `open_dataset` (the `rec` "
            f"source), its epoch-0 shard plan (batch {args.batch}), then its samples' labels and "
            "offsets read as an epoch does; memory measured while all ranks hold their maps. Cold: "
            "no index cache and the `.rec`/`.idx` evicted from the page cache (`posix_fadvise`); "
            "warm: the table cached. Ranks import numpy and `data_pipelines` only (no torch).",
            "",
            *lines,
            "",
            f"Cold build ({cold['layout']} layout): {cold['records_read']:,} record headers read of "
            f"{args.records + args.identities + 1:,} (the header, the identity records and the "
            f"records around float32-rounded range bounds past key 2^24); table "
            f"{notes['table_gb']} GB on disk, mapped read-only by every rank. {notes['verified']}.",
            "",
            f"The tools on the same file, one process each, cold: the per-record scan that "
            f"header-less layouts and `check --full` run (without `--full`'s decode of every "
            f"image; these payloads are not JPEGs) took {notes['scan']['s']:.0f} s at "
            f"{_gb(notes['scan']['VmHWM'])} GB peak RSS; `python -m data_pipelines.check PREFIX` "
            f"(layout index, 1000 sampled decodes) {notes['check']['s']:.0f} s at "
            f"{_gb(notes['check']['VmHWM'])} GB.",
            "",
            f"Every rank's peak RSS ≤ 2 GB, cold and warm: **{rss_ok}** (max {_gb(peak)} GB). "
            f"Warm PSS of {max(_RANKS)} ranks ≤ 1.5× one rank's: **{pss_ok}** "
            f"({_gb(four)} GB against {_gb(one)} GB, {four / one:.2f}×).",
            "",
            "Before (issue 25, the `.npz` cache loaded by every rank, not re-measured here): "
            "cold 22.4 s and 6.5 GB peak RSS per rank; warm 4.5 s alone and 1.68 GB, 1.63 GB "
            "PSS per rank with 4 ranks (nothing shared).",
        ]
    )


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM; Python "
        f"{platform.python_version()}, numpy {np.__version__}, Linux {platform.release()}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pfc_ds.bench.index", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--records", type=int, default=42_000_000, help="image records")
    ap.add_argument("--identities", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=128, help="per-rank batch of the shard plan")
    ap.add_argument(
        "--workdir", default=None, help="where the test file goes (default: a temp dir)"
    )
    ap.add_argument(
        "--benchmarks", default="BENCHMARKS.md", help="file whose index section is rewritten"
    )
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    ap.add_argument("--tool-worker", nargs=2, metavar=("TOOL", "PREFIX"), help=argparse.SUPPRESS)
    ap.add_argument("--rank-worker", nargs=5, metavar=("PREFIX", "CACHE", "RANK", "WORLD", "B"), help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args(argv)
    if args.tool_worker:
        tool_main(*args.tool_worker)
        return
    if args.rank_worker:
        prefix, cache, rank, world, batch = args.rank_worker
        rank_main(prefix, cache, int(rank), int(world), int(batch))
        return
    from data_pipelines.cache import open_index

    work = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir))
    try:
        prefix, cache = str(work / "data" / "train"), str(work / "cache")
        (work / "data").mkdir()
        notes = {"machine": machine(), "avail": available_gib()}
        loads = [load_average()]
        t0 = time.perf_counter()
        write_test_file(prefix, args.records, args.identities)
        notes["write_s"] = time.perf_counter() - t0
        notes["rec_gb"] = _gb(os.path.getsize(prefix + ".rec"))
        notes["idx_gb"] = _gb(os.path.getsize(prefix + ".idx"))
        notes["when"] = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
        print(f"wrote {prefix}.rec in {notes['write_s']:.0f} s", file=sys.stderr)
        results = {}
        for world in _RANKS:
            for state in ("cold", "warm"):
                if state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                    evict([prefix + ".rec", prefix + ".idx"])
                results[(world, state)] = run_ranks(
                    prefix, cache, world, args.batch, work / "ranks.log"
                )
                loads.append(load_average())
                r = results[(world, state)]
                print(
                    f"{world} rank(s) {state}: open {max(x['open_s'] for x in r):.1f} s, peak RSS "
                    f"{_gb(max(x['VmHWM'] for x in r))} GB, PSS {_gb(sum(x['Pss'] for x in r))} GB",
                    file=sys.stderr,
                )
                if (world, state) == (1, "cold"):
                    scan = open_index(prefix, cache)
                    notes["verified"] = verify(scan, args.records, args.identities)
                    notes["table_gb"] = _gb(
                        sum(p.stat().st_size for p in Path(scan.table_dir).glob("*.bin"))
                    )
                    del scan
        for tool in ("scan", "check"):
            evict([prefix + ".rec", prefix + ".idx"])
            notes[tool] = run_tool(tool, prefix, work / "ranks.log")
            loads.append(load_average())
            print(
                f"{tool}: {notes[tool]['s']:.0f} s, peak RSS {_gb(notes[tool]['VmHWM'])} GB",
                file=sys.stderr,
            )
        notes["load"] = (min(loads), max(loads))
        body = table(results, args, notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(body)
    if not args.no_write:
        from pfc_ds.bench.sections import write_section

        write_section("index", body, args.benchmarks, say=True)


if __name__ == "__main__":
    main()
