"""The GPU check's steps, their budgets and their verdicts (``tools/gpu_check.sh`` runs this).

    python tools/gpu_check.py plan                 the steps and their budgets (seconds)
    python tools/gpu_check.py dry-run              every command line, each module and config
                                                   it names checked to exist (no GPU needed)
    python tools/gpu_check.py run --out DIR        run the check (needs CUDA: else exit 3)
    python tools/gpu_check.py trainer|banks|decode --work DIR   one composite step

The lent GPU machine gives one command at most 600 s and sends back at most 8 files, so the
plan's budgets add up to at most ``TOTAL_BUDGET`` (540 s, leaving the machine's start-up and the
transfers room) and everything that comes back lies directly in ``--out``: ``summary.txt`` (each
step ok / FAILED / TIMEOUT / skipped, with its time), ``results.json`` (every figure),
``logs.tar.gz`` (every log) and ``BENCHMARKS.md`` with its GPU sections rewritten. The steps
go cheapest and most important first: correctness before timing.

Each step runs under its own ``timeout``, so one that hangs costs its budget and no more; a
failed step is reported and the others still run. The composite steps (``trainer``, ``banks``,
``decode``) launch ``train.py`` / ``pfc_ds.profile`` through ``torchrun`` and judge what they
wrote (``metrics.jsonl``, ``profile.json``); their verdicts are plain functions of those records,
tested on the CPU (``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TOTAL_BUDGET = 540
# Figures whose sections the check rewrites when run in a checkout.
SECTION = "gpu_check"

# The trainer smoke: iresnet50, fp16 ZeRO-2 at the shipped initial scale 2^16, synthetic faces.
SMOKE_CONFIG = "configs/synthetic_3m_pfc01_r50.yaml"
SMOKE_SET = [
    "data.num_classes=1000",
    "data.num_images=1000000",
    "train.batch_size=128",
    "train.max_steps=45",
    "train.save_every=0",
    "train.log_every=1",
    "optim.warmup_epochs=0",
]
SMOKE_STEPS, RESUME_TO, INF_STEP, MAX_SKIPS = 40, 45, 30, 3


# ---- the plan ----------------------------------------------------------------------------------


@dataclass
class Step:
    """One step of the check: ``commands`` run one after another under one ``budget``."""

    name: str
    budget: int  # seconds, for all its commands together
    what: str
    commands: Callable[[Path], list[list[str]]]
    needs: str | None = None  # a module that must import, else the step is skipped
    notes: list[str] = field(default_factory=list)


def _self(*args: str) -> Callable[[Path], list[list[str]]]:
    return lambda work: [[PY, "tools/gpu_check.py", *args, "--work", str(work)]]


def _torchrun(module_or_script: list[str]) -> list[str]:
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(_free_port()),
        *module_or_script,
    ]


def _free_port() -> int:
    """A free port for torchrun (``--master_port 0`` hangs at rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_commands(work: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The trainer smoke's launches: name -> (argv, extra environment)."""
    out = work / "trainer"
    base = ["train.py", "--config", SMOKE_CONFIG]
    sets = [a for kv in SMOKE_SET for a in ("--set", kv)]
    return {
        "zero2_fp16": (
            _torchrun(
                [
                    *base,
                    "--deepspeed_config",
                    "ds_configs/zero2_fp16.json",
                    *sets,
                    "--max-steps",
                    str(SMOKE_STEPS),
                    "--output",
                    str(out / "zero2_fp16"),
                ]
            ),
            {"PFC_DS_FAULT": f"head_inf:step={INF_STEP}"},
        ),
        "zero2_fp16_resume": (
            _torchrun(
                [
                    *base,
                    "--deepspeed_config",
                    "ds_configs/zero2_fp16.json",
                    *sets,
                    "--max-steps",
                    str(RESUME_TO),
                    "--output",
                    str(out / "zero2_fp16"),
                    "--resume",
                ]
            ),
            {},
        ),
        "zero3_fp16": (
            _torchrun(
                [
                    *base,
                    "--deepspeed_config",
                    "ds_configs/zero3_fp16.json",
                    *sets,
                    "--max-steps",
                    "10",
                    "--output",
                    str(out / "zero3_fp16"),
                ]
            ),
            {},
        ),
        "zero1_bf16": (
            _torchrun(
                [
                    *base,
                    "--deepspeed_config",
                    "ds_configs/zero1_bf16.json",
                    *sets,
                    "--max-steps",
                    "10",
                    "--output",
                    str(out / "zero1_bf16"),
                ]
            ),
            {},
        ),
    }


BANK_SET = [
    "data.num_classes=20000000",
    "model.embedding_size=256",
    "head.dtype=fp16",
    "train.batch_size=128",
]


def bank_command(work: Path, bank: str) -> list[str]:
    sets = [a for kv in [*BANK_SET, f"head.bank={bank}"] for a in ("--set", kv)]
    return [
        PY,
        "-m",
        "pfc_ds.profile",
        "--config",
        SMOKE_CONFIG,
        "--deepspeed_config",
        "ds_configs/zero2_fp16.json",
        "--ranks",
        "1",
        "--warmup",
        "3",
        "--steps",
        "10",
        "--output",
        str(work / f"bank_{bank}"),
        *sets,
    ]


def decode_commands(work: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """A synthetic ``.rec`` (insightface layout) decoded by nvImageCodec on the GPU, feeding
    10 trainer steps."""
    prefix = work / "decode" / "faces"
    sets = [
        "data.source=rec",
        f"data.path={prefix}.rec",
        "data.decoder=nvimgcodec",
        "data.num_classes=null",
        "model.backbone=r18",
        "train.batch_size=128",
        "train.max_steps=10",
        "train.save_every=0",
        "train.log_every=1",
    ]
    return {
        "pack": (
            [PY, "-m", "data_pipelines.synth", str(prefix), "--ids", "200", "--per-id", "20"],
            {},
        ),
        "train": (
            _torchrun(
                [
                    "train.py",
                    "--config",
                    SMOKE_CONFIG,
                    "--deepspeed_config",
                    "ds_configs/zero2_fp16.json",
                    *[a for kv in sets for a in ("--set", kv)],
                    "--output",
                    str(work / "decode" / "run"),
                ]
            ),
            {},
        ),
    }


STEPS = [
    Step("preflight", 10, "CUDA, versions, disk and RAM", _self("preflight")),
    Step(
        "gpu_tests",
        90,
        "pytest -m gpu (head, banks and accumulation on CUDA, sync debug)",
        lambda work: [
            [
                PY,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "tests",
                "-p",
                "no:cacheprovider",
                f"--junitxml={work / 'gpu_tests.xml'}",
            ]
        ],
    ),
    Step(
        "trainer_zero2_fp16",
        100,
        f"r50 fp16 ZeRO-2 at scale 2^16: {SMOKE_STEPS} steps, inf in a head gradient at step "
        f"{INF_STEP}, --resume to {RESUME_TO}",
        _self("trainer", "--launches", "zero2_fp16,zero2_fp16_resume"),
        needs="deepspeed",
    ),
    Step(
        "trainer_zero3_zero1",
        60,
        "10 steps each of ZeRO-3 fp16 and ZeRO-1 bf16",
        _self("trainer", "--launches", "zero3_fp16,zero1_bf16"),
        needs="deepspeed",
    ),
    Step(
        "bank_device_20m",
        50,
        "device bank, 20M ids, D=256 fp16: time split",
        lambda work: [bank_command(work, "device")],
        needs="deepspeed",
    ),
    Step(
        "bank_host_20m",
        50,
        "host bank, 20M ids, D=256 fp16: time split and lane traffic",
        lambda work: [bank_command(work, "host")],
        needs="deepspeed",
    ),
    Step(
        "head_bench",
        80,
        "head step at 1M and 10M ids, fp16, against dense PFC and the floor",
        lambda work: [
            [
                PY,
                "-m",
                "pfc_ds.bench.head",
                "--device",
                "cuda",
                "--classes",
                "1000000",
                "--sweep",
                "10000000",
                "--skip-dense-fc",
                "--repeats",
                "1",
                "--steps",
                "5",
                "--write",
            ]
        ],
    ),
    Step(
        "profile_r50",
        45,
        "r50 fp16 ZeRO-2 at 1M ids, CUDA-event time split",
        lambda work: [
            [
                PY,
                "-m",
                "pfc_ds.profile",
                "--config",
                SMOKE_CONFIG,
                "--deepspeed_config",
                "ds_configs/zero2_fp16.json",
                "--ranks",
                "1",
                "--steps",
                "20",
                "--output",
                str(work / "profile_r50"),
                "--set",
                "data.num_classes=1000000",
                "--set",
                "train.batch_size=128",
            ]
        ],
        needs="deepspeed",
    ),
    Step(
        "decode_nvimgcodec",
        45,
        "GPU JPEG decode (nvImageCodec) feeding 10 trainer steps",
        _self("decode"),
        needs="nvidia.nvimgcodec",
    ),
]


def plan_text() -> str:
    lines = [f"{'step':22s} {'budget s':>8s}  what"]
    lines += [f"{s.name:22s} {s.budget:8d}  {s.what}" for s in STEPS]
    total = sum(s.budget for s in STEPS)
    lines.append(f"{'total':22s} {total:8d}  (at most {TOTAL_BUDGET})")
    return "\n".join(lines)


# ---- the dry run: every command line, and what it names exists ---------------------------------


def _problems(argv: list[str]) -> list[str]:
    """What in ``argv`` does not exist: modules, scripts, configs, config keys."""
    out = []
    args = argv[1:]
    if args[:1] == ["-m"] and args[1] == "torch.distributed.run":
        args = args[args.index("--master_port") + 2 :]  # what torchrun launches
    if args[:1] == ["-m"]:
        module = args[1]
        if not _findable(module):
            out.append(f"module {module} not found")
        rest = args[2:]
    else:
        script = args[0]
        if not (ROOT / script).exists():
            out.append(f"script {script} not found")
        rest = args[1:]
    for a in rest:
        is_file = a.endswith((".yaml", ".json")) and not a.startswith("--") and "=" not in a
        if is_file and not (ROOT / a).exists() and not Path(a).is_absolute():
            out.append(f"file {a} not found")
    if "--config" in rest:
        from pfc_ds.train.cli import check

        argv_train = [a for a in rest if a != "--resume"]
        problem = check(argv_train, gpu=True)
        if problem is not None:
            out.append(f"config: {problem}")
    return out


def dry_run(work: Path) -> int:
    """Print every command line of the plan; 1 if anything it names is missing."""
    bad = 0
    print(plan_text())
    for step in STEPS:
        cmds = step.commands(work)
        if step.name.startswith("trainer"):
            launches = cmds[0][cmds[0].index("--launches") + 1].split(",")
            cmds = cmds + [trainer_commands(work)[n][0] for n in launches]
        elif step.name == "decode_nvimgcodec":
            cmds = cmds + [argv for argv, _ in decode_commands(work).values()]
        for argv in cmds:
            print(f"[{step.name}] {' '.join(argv)}")
            if argv[1] == "tools/gpu_check.py":  # a composite step: its launches follow
                continue
            problems = _problems(argv)
            for p in problems:
                print(f"    MISSING: {p}")
            bad += bool(problems)
    if sum(s.budget for s in STEPS) > TOTAL_BUDGET:
        print(f"    the budgets add up to more than {TOTAL_BUDGET} s")
        bad += 1
    print("dry run: ok" if not bad else f"dry run: {bad} command(s) name something missing")
    return 1 if bad else 0


# ---- verdicts (plain functions of what the runs wrote; tested on the CPU) ----------------------


def read_metrics(path: Path) -> list[dict]:
    """Training records (those with a loss) of ``metrics.jsonl``, in file order."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "step" in r]


def judge_fp16_smoke(rows: list[dict], inf_step: int, steps: int, max_skips: int) -> dict:
    """The fp16 ZeRO-2 smoke: the loss falls, few skips besides the injected one, and the
    injected inf skips that step and halves the loss scale exactly once."""
    by_step = {r["step"]: r for r in rows}
    problems = []
    if sorted(by_step) != list(range(1, steps + 1)):
        problems.append(f"steps logged: {sorted(by_step)[:5]}... not 1..{steps}")
    skipped = [s for s, r in sorted(by_step.items()) if r.get("skipped")]
    other = [s for s in skipped if s != inf_step]
    if len(other) > max_skips:
        problems.append(f"{len(other)} steps skipped besides the injected one: {other}")
    if inf_step not in skipped:
        problems.append(f"step {inf_step} (inf in a head gradient) was not skipped")
    before = by_step.get(inf_step, {}).get("loss_scale")
    after = by_step.get(inf_step + 1, {}).get("loss_scale")
    if before is None or after is None or after != before / 2:
        problems.append(f"loss scale around the injected inf: {before} -> {after}, not halved")
    good = [r["loss"] for s, r in sorted(by_step.items()) if not r.get("skipped")]
    first, last = good[:5], good[-5:]
    falls = len(good) >= 10 and sum(last) / len(last) < sum(first) / len(first)
    if not falls:
        problems.append(f"the loss did not fall: first {first}, last {last}")
    history, previous = [], None
    for s, r in sorted(by_step.items()):
        if r.get("loss_scale") != previous:
            history.append([s, r.get("loss_scale")])
            previous = r.get("loss_scale")
    return {
        "ok": not problems,
        "problems": problems,
        "skipped_steps": skipped,
        "scale_history": history,
        "loss_first5": first,
        "loss_last5": last,
        "img_per_s_median": _median([r["img_per_s"] for r in rows[1:] if "img_per_s" in r]),
    }


def judge_resume(rows: list[dict], first: int, last: int) -> dict:
    """A resumed run appends steps ``first..last`` (after the first run's), all finite."""
    steps = [r["step"] for r in rows]
    tail = steps[steps.index(first) :] if first in steps else []
    problems = []
    if tail != list(range(first, last + 1)):
        problems.append(f"resumed steps {tail}, not {first}..{last}")
    losses = [r["loss"] for r in rows if r["step"] >= first]
    if not all(_finite(x) for x in losses):
        problems.append(f"non-finite resumed losses {losses}")
    return {"ok": not problems, "problems": problems, "losses": losses}


def judge_short(rows: list[dict], steps: int, max_skips: int) -> dict:
    """A short run: ``steps`` steps, finite losses, at most ``max_skips`` skipped."""
    problems = []
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        problems.append(f"steps logged {[r['step'] for r in rows]}")
    skipped = [r["step"] for r in rows if r.get("skipped")]
    if len(skipped) > max_skips:
        problems.append(f"skipped steps {skipped}")
    if not all(_finite(r["loss"]) for r in rows if not r.get("skipped")):
        problems.append("non-finite loss")
    return {
        "ok": not problems,
        "problems": problems,
        "skipped_steps": skipped,
        "losses": [r["loss"] for r in rows],
        "img_per_s_median": _median([r["img_per_s"] for r in rows[1:] if "img_per_s" in r]),
    }


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


# ---- composite steps ---------------------------------------------------------------------------


def _launch(name: str, argv: list[str], extra_env: dict[str, str], work: Path) -> int:
    env = dict(os.environ, **extra_env)
    log = work / f"{name}.log"
    print(f"$ {' '.join(argv)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    print(f"  -> exit {rc} ({log})", flush=True)
    if rc:
        print("".join(log.read_text().splitlines(keepends=True)[-30:]), flush=True)
    return rc


def run_trainer(work: Path, launches: list[str]) -> dict:
    cmds = trainer_commands(work)
    res: dict = {}
    for name in launches:
        argv, env = cmds[name]
        rc = _launch(name, argv, env, work)
        out = Path(argv[argv.index("--output") + 1])
        rows = read_metrics(out / "metrics.jsonl")
        if name == "zero2_fp16":
            verdict = judge_fp16_smoke(rows, INF_STEP, SMOKE_STEPS, MAX_SKIPS)
        elif name == "zero2_fp16_resume":
            verdict = judge_resume(rows, SMOKE_STEPS + 1, RESUME_TO)
        else:
            verdict = judge_short(rows, 10, MAX_SKIPS if "fp16" in name else 0)
        verdict["exit"] = rc
        verdict["ok"] = verdict["ok"] and rc == 0
        res[name] = verdict
        print(f"  {name}: {'ok' if verdict['ok'] else 'FAILED ' + '; '.join(verdict['problems'])}")
    return res


def run_decode(work: Path) -> dict:
    (work / "decode").mkdir(parents=True, exist_ok=True)
    res: dict = {}
    for name, (argv, env) in decode_commands(work).items():
        rc = _launch(f"decode_{name}", argv, env, work)
        res[name] = {"exit": rc}
        if rc:
            res["ok"] = False
            return res
    rows = read_metrics(work / "decode" / "run" / "metrics.jsonl")
    res["train"] = {**judge_short(rows, 10, MAX_SKIPS), "exit": 0}
    res["ok"] = res["train"]["ok"]
    return res


def preflight() -> dict:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check", file=sys.stderr)
        raise SystemExit(3)
    info = {
        "gpu": torch.cuda.get_device_name(),
        "gpu_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for mod in ("deepspeed", "nvidia.dali", "torchvision", "nvidia.nvimgcodec", "onnxruntime"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "present")
        except Exception as exc:  # absent, or failing to import: say which
            info[mod] = f"not importable ({type(exc).__name__}: {str(exc)[:80]})"
    du = shutil.disk_usage(ROOT)
    info["disk_free_gb"] = du.free / 2**30
    with open("/proc/meminfo") as f:
        mem = {line.split(":")[0]: line.split()[1] for line in f}
    info["ram_available_gb"] = int(mem.get("MemAvailable", 0)) / 2**20
    info["cpus"] = os.cpu_count()
    for k, v in info.items():
        print(f"{k}: {v}")
    return info


# ---- the run -----------------------------------------------------------------------------------


def _step_figures(step: Step, work: Path) -> dict:
    """What a step wrote that belongs in results.json."""
    figures: dict = {}
    fragment = work / "results" / f"{step.name}.json"
    if fragment.exists():
        figures.update(json.loads(fragment.read_text()))
    profile = {
        "profile_r50": work / "profile_r50" / "profile.json",
        "bank_device_20m": work / "bank_device" / "profile.json",
        "bank_host_20m": work / "bank_host" / "profile.json",
    }.get(step.name)
    if profile is not None and profile.exists():
        p = json.loads(profile.read_text())
        figures["profile"] = {
            k: p.get(k)
            for k in (
                "backbone",
                "precision",
                "zero_stage",
                "num_classes",
                "bank",
                "global_batch",
                "img_per_s",
                "wall_img_per_s",
                "step_ms",
                "split_ms",
                "peak_mb",
                "memory_mb",
                "lane_per_step",
            )
        }
    if step.name == "gpu_tests":
        figures.update(_junit(work / "gpu_tests.xml"))
    return figures


def _junit(path: Path) -> dict:
    if not path.exists():
        return {}
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"tests": counts, "failed": failed}


def run(out: Path, work: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results").mkdir(exist_ok=True)
    summary = out / "summary.txt"
    summary.write_text(f"pfc_ds GPU check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    results: dict = {"date": str(date.today()), "plan": {s.name: s.budget for s in STEPS}}
    failed = 0
    for step in STEPS:
        t0 = time.monotonic()
        log = work / f"{step.name}.log"
        if step.needs and not _findable(step.needs):
            status, rc = f"skipped ({step.needs} is not installed)", None
        else:
            rc = 0
            deadline = t0 + step.budget
            with open(log, "w") as f:
                for argv in step.commands(work):
                    left = max(1, int(deadline - time.monotonic()))
                    f.write(f"$ {' '.join(argv)}\n")
                    f.flush()
                    rc = subprocess.call(
                        ["timeout", "-k", "10", str(left), *argv],
                        cwd=ROOT,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )
                    if rc:
                        break
            status = "ok" if rc == 0 else ("TIMEOUT" if rc in (124, 137) else f"FAILED (exit {rc})")
        seconds = time.monotonic() - t0
        failed += not (status == "ok" or status.startswith("skipped"))
        entry = {
            "status": status,
            "seconds": round(seconds, 1),
            "budget": step.budget,
            "what": step.what,
            **_step_figures(step, work),
        }
        results[step.name] = entry
        line = f"{step.name:22s} {status:18s} {seconds:6.1f} s / {step.budget} s  {step.what}"
        with open(summary, "a") as f:
            f.write(line + "\n")
            if rc and log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                f.writelines(f"    | {t}\n" for t in tail)
        print(line, flush=True)
        if step.name == "preflight" and rc == 3:
            break
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    with open(summary, "a") as f:
        f.write(f"failed steps: {failed}\n")
    _write_section(results)
    if (ROOT / "BENCHMARKS.md").exists():
        shutil.copy(ROOT / "BENCHMARKS.md", out / "BENCHMARKS.md")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="gpu_check")
    return failed


def _findable(module: str) -> bool:
    """Installed, without importing it (DeepSpeed's import alone takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _write_section(results: dict) -> None:
    """Rewrite BENCHMARKS.md's ``gpu_check`` section: the card, the date, each step's verdict."""
    path = ROOT / "BENCHMARKS.md"
    if not path.exists() or f"<!-- BEGIN {SECTION} -->" not in path.read_text():
        return
    pre = results.get("preflight", {}).get("info", {})
    lines = [
        "### The GPU check (`tools/gpu_check.sh`)",
        "",
        f"{pre.get('gpu', 'unknown GPU')}, torch {pre.get('torch')}, DeepSpeed "
        f"{pre.get('deepspeed')}, {results['date']}.",
        "",
        "| step | status | s / budget |",
        "|---|---|---|",
    ]
    for name in results["plan"]:
        r = results.get(name, {})
        lines.append(
            f"| {name} | {r.get('status', 'not run')} | {r.get('seconds')} / {r.get('budget')} |"
        )
    from pfc_ds.bench.sections import write_section

    write_section(SECTION, "\n".join(lines), path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=("plan", "dry-run", "run", "preflight", "trainer", "decode"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/pfc_ds_gpu_check"))
    p.add_argument("--launches", default=",".join(trainer_commands(Path("/tmp")).keys()))
    args = p.parse_args(argv)
    if args.what == "plan":
        print(plan_text())
        return 0
    if args.what == "dry-run":
        return dry_run(args.work)
    if args.what == "run":
        return min(run(args.out, args.work), 100)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results").mkdir(exist_ok=True)
    if args.what == "preflight":
        res = {"info": preflight(), "ok": True}
        name = "preflight"
    elif args.what == "trainer":
        launches = args.launches.split(",")
        res = run_trainer(args.work, launches)
        res["ok"] = all(v["ok"] for v in res.values() if isinstance(v, dict))
        name = "trainer_zero2_fp16" if "zero2_fp16" in launches else "trainer_zero3_zero1"
    else:
        res = run_decode(args.work)
        name = "decode_nvimgcodec"
    (args.work / "results" / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
