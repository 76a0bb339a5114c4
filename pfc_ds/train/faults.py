"""Fault injection for the reliability tests, read from ``PFC_DS_FAULT`` (unset in real runs,
where every hook is one truth test).

Faults are ``kind:key=value,...`` separated by ``;``::

    save_delay:seconds=1.5,step=10   sleep after each checkpoint file (of step 10; any step if
                                     no step), so a test can kill a rank mid-save
    hang:step=6,rank=1               rank 1 sleeps (``seconds``, default a day) before step 6
    kill:step=9,rank=1               rank 1 SIGKILLs itself before step 9
    nan:step=4,count=3               steps 4-6 get NaN images (every rank unless ``rank``)
    head_inf:step=30,rank=0          row 0 of the head's row gradient becomes inf at step 30,
                                     after the head's backward (the backbone's stays finite)
    enospc:file=head_shard,step=4    writing a checkpoint file whose name holds ``head_shard``
                                     (of step 4; any step if no step) fails with ENOSPC
    gloo_loopback:rank=1             rank 1 takes 127.0.0.1 as its route to MASTER_ADDR, so the
                                     gloo interface pick lands on loopback (what gloo's hostname
                                     rule does under Debian's /etc/hosts)

A fault fires only in launch attempt ``attempt`` (default 0, matched against torchrun's
``TORCHELASTIC_RESTART_COUNT``), and a step's fault at most once per process, so a restarted or
rolled-back run replays those steps clean. Each firing prints one ``pfc_ds fault:`` line to
stderr with the wall time, for the tests to measure from.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import torch

ENV = "PFC_DS_FAULT"
KINDS = ("save_delay", "hang", "kill", "nan", "head_inf", "enospc", "gloo_loopback")


def _parse(text: str) -> list[tuple[str, dict[str, str]]]:
    faults = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        kind, _, args = item.partition(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
        params: dict[str, str] = {}
        for arg in filter(None, args.split(",")):
            key, sep, value = arg.partition("=")
            if not sep:  # a bare value: save_delay:2
                key, value = "seconds", key
            params[key.strip()] = value.strip()
        faults.append((kind, params))
    return faults


class Faults:
    """The faults of this rank and launch attempt."""

    def __init__(self, text: str | None, rank: int, attempt: int | None = None) -> None:
        if attempt is None:
            attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.rank = rank
        self.faults = [
            (kind, p)
            for kind, p in _parse(text or "")
            if int(p.get("rank", rank)) == rank and int(p.get("attempt", 0)) == attempt
        ]
        self._fired: set[tuple[str, int]] = set()

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        return cls(os.environ.get(ENV), rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _say(self, what: str) -> None:
        print(f"pfc_ds fault: rank {self.rank} {what} t={time.time():.3f}", file=sys.stderr)
        sys.stderr.flush()

    def _due(self, kind: str, step: int, params: dict[str, str]) -> bool:
        first = int(params.get("step", step))
        if not first <= step < first + int(params.get("count", 1)):
            return False
        if (kind, step) in self._fired:
            return False
        self._fired.add((kind, step))
        return True

    def before_step(self, step: int) -> None:
        """Before optimizer step ``step`` (1-based): hang or die."""
        for kind, p in self.faults:
            if kind == "hang" and self._due(kind, step, p):
                self._say(f"hangs at step {step}")
                time.sleep(float(p.get("seconds", 86400)))
            elif kind == "kill" and self._due(kind, step, p):
                self._say(f"kill -9 at step {step}")
                os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """NaN images for the steps of a ``nan`` fault (each step once)."""
        for kind, p in self.faults:
            if kind == "nan" and self._due(kind, step, p):
                self._say(f"NaN images at step {step}")
                return images * float("nan")
        return images

    def head_inf(self, step: int) -> bool:
        """Whether step ``step`` gets an inf in this rank's head row gradient (once)."""
        for kind, p in self.faults:
            if kind == "head_inf" and self._due(kind, step, p):
                self._say(f"inf in a head row gradient at step {step}")
                return True
        return False

    def before_file(self, path: Path, step: int) -> None:
        for kind, p in self.faults:
            if kind != "enospc" or int(p.get("step", step)) != step:
                continue
            if p.get("file", "") in path.name:
                self._say(f"ENOSPC writing {path.name}")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def after_file(self, path: Path, step: int) -> None:
        for kind, p in self.faults:
            if kind == "save_delay" and int(p.get("step", step)) == step:
                self._say(f"wrote {path.name} (step {step})")
                time.sleep(float(p.get("seconds", 1)))

    def gloo_source(self) -> str | None:
        """The local address to take for the route to ``MASTER_ADDR`` (``gloo_loopback``)."""
        if any(kind == "gloo_loopback" for kind, _ in self.faults):
            self._say("takes 127.0.0.1 as its route to MASTER_ADDR")
            return "127.0.0.1"
        return None
