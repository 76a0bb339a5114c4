"""Several nodes for real (issue 27): gloo's network interface, picked and agreed.

The unit tests check the pieces of ``pfc_ds.train.network`` on this machine's loopback. The slow
tests build two hosts: two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2, one
interface each plus loopback), whose shared hostname resolves to ``127.0.1.1`` as Debian's
``/etc/hosts`` makes it (``/etc/netns/NAME/hosts``, which ``ip netns exec`` mounts over
``/etc/hosts``), and run the README's recipe on each: ``torchrun --nnodes 2 --node_rank I
--nproc_per_node 1 --master_addr 10.77.0.1``, one output folder for both, no
``GLOO_SOCKET_IFNAME``:

* the demo trains to step 20 on both, equal bit for bit (head shards, backbone, data position,
  loss) to one node with two ranks;
* a killed host: the other exits 75 naming rank 1;
* a loopback pick (the ``gloo_loopback`` fault, i.e. gloo's hostname rule): every node refuses
  in one line, within 60 s;
* a node whose gloo address the other cannot reach (``GLOO_SOCKET_IFNAME`` on a second veth pair
  that leads nowhere): every node exits 75 within 60 s with one line naming the addresses.

They need root and iproute2's ``ip``; where namespaces cannot be made they skip, saying why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch.distributed as dist

from pfc_ds.train import network
from pfc_ds.train.faults import Faults
from pfc_ds.train.network import Endpoint, GlooInterfaceError
from pfc_ds.train.peers import EXIT_CODE, PeerFailure
from tests.dist import free_port
from tests.multinode_helpers import ROOT, TRAIN, assert_same_run, env, losses, torchrun

MASTER = "10.77.0.1"
STEPS = ["--max-steps", "20", "--set", "train.save_every=10"]


# ---- units -------------------------------------------------------------------------------------


def test_route_source_and_the_interface_gloo_reads():
    table = network.interface_addresses()
    assert ("lo", "127.0.0.1") in table
    assert network.route_source("127.0.0.1") == "127.0.0.1"
    assert network.interface_of("127.0.0.1", table) == "lo"
    assert network.gloo_address("lo", table) == "127.0.0.1"
    assert network.gloo_address("no-such-if", table) is None
    assert network.is_loopback("127.0.1.1") and network.is_loopback("::1")
    assert not network.is_loopback("10.77.0.1") and not network.is_loopback("?")


@pytest.fixture
def no_pick(monkeypatch):
    """``choose_interface`` writes ``os.environ`` and remembers its pick: both undone after."""
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    yield
    network._picked.clear()


def test_choose_interface_follows_the_route_unless_the_user_set_it(monkeypatch, no_pick):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert network.choose_interface() == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    me = network.local_endpoint(3)
    assert (me.rank, me.address, me.interface) == (3, "127.0.0.1", "lo")
    assert me.how == "GLOO_SOCKET_IFNAME=lo picked by pfc_ds: the route to 127.0.0.1"

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    network._picked.clear()
    assert network.choose_interface() is None  # the user's choice stands
    assert network.local_endpoint(0).how == "GLOO_SOCKET_IFNAME=lo set by the user"

    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.delenv("MASTER_ADDR")
    assert network.choose_interface() is None and "GLOO_SOCKET_IFNAME" not in os.environ


def test_the_gloo_loopback_fault_forces_the_route_of_its_ranks():
    assert Faults("gloo_loopback:rank=1", rank=1).gloo_source() == "127.0.0.1"
    assert Faults("gloo_loopback:rank=1", rank=0).gloo_source() is None
    assert Faults("gloo_loopback", rank=0).gloo_source() == "127.0.0.1"
    assert Faults(None, rank=0).gloo_source() is None


def _ep(rank: int, host: str, address: str, interface: str, how: str = "x") -> Endpoint:
    return Endpoint(rank, str(rank), host, address, interface, how)


def test_check_refuses_loopback_across_hosts_and_unknown_interfaces(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", MASTER)
    one_host = [_ep(0, "h", "127.0.0.1", "lo"), _ep(1, "h", "127.0.0.1", "lo")]
    network.check(one_host, "default", 0)  # one host: loopback reaches every rank
    two_hosts = [_ep(0, "h0", MASTER, "eth0"), _ep(1, "h1", "127.0.0.1", "lo", "why")]
    network.check([two_hosts[0], _ep(1, "h1", "10.77.0.2", "eth0")], "default", 1)
    with pytest.raises(GlooInterfaceError) as err:
        network.check(two_hosts, "default", 0)
    text = str(err.value)
    assert text.startswith("rank 0: the gloo default group would listen on a loopback address")
    for part in ("rank 1 (node 1) 127.0.0.1 on lo (why)", f"MASTER_ADDR={MASTER}",
                 "GLOO_SOCKET_IFNAME", "the job spans 2 hosts"):  # fmt: skip
        assert part in text, part
    assert "\n" not in text
    typo = [_ep(0, "h0", MASTER, "eth0"), _ep(1, "h1", "?", "eht0", "GLOO_SOCKET_IFNAME=eht0")]
    with pytest.raises(GlooInterfaceError, match=r"no address to listen on: rank 1 .*'eht0'"):
        network.check(typo, "control", 1)


def test_agree_returns_every_endpoint_and_names_a_rank_that_never_came():
    store = dist.HashStore()
    them = _ep(1, "h1", "10.77.0.2", "eth0")
    store.set("pfc_ds/gloo_endpoints/default/1", json.dumps(asdict(them)))
    me = _ep(0, "h0", MASTER, "eth0")
    got = network.agree(store, "default", me, 2, dt.timedelta(seconds=5))
    assert got == [me, them]
    with pytest.raises(PeerFailure, match=r"rank\(s\) \[1\] did not reach the setup of the gloo "):
        network.agree(dist.HashStore(), "control", me, 2, dt.timedelta(seconds=0.5))


def test_connect_failure_reads_the_same_on_every_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", MASTER)
    eps = [_ep(0, "h0", MASTER, "veth0"), _ep(1, "h1", "10.76.0.2", "veth1")]
    a = str(network.connect_failure(eps, "default", 0, 30, "connect: Network is unreachable"))
    b = str(network.connect_failure(eps, "default", 1, 30, "no connection\nmore"))
    assert a.startswith("rank 0: ") and b.startswith("rank 1: ") and "\n" not in b
    assert _common(a) == _common(b)
    assert "train.connect_timeout_s=30" in a and "10.76.0.2 on veth1" in a
    assert a.endswith("gloo on this rank: connect: Network is unreachable")


def test_a_connect_that_hangs_ends_the_process_at_the_deadline(tmp_path):
    """gloo's waiting side outlasts its timeout; the deadline thread does not."""
    code = (
        "import datetime as dt, os, time, torch.distributed as dist\n"
        "from pfc_ds.train.network import Connecting\n"
        "os.environ['MASTER_ADDR'] = '127.0.0.1'\n"
        "with Connecting(dist.HashStore(), 'default', 0, 1, dt.timedelta(seconds=60), 1.0):\n"
        "    time.sleep(30)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == EXIT_CODE, proc.stderr
    assert "train.connect_timeout_s=1: " in proc.stderr
    assert "no connection from a peer after 1 s" in proc.stderr
    assert took < 20, took  # the interpreter's start-up, then 1 s


def _common(line: str) -> str:
    """A failure line without its rank prefix and its rank's own gloo error."""
    line = re.sub(r"^(train\.py: error: )?rank \d+: ", "", line.strip())
    return line.split(" gloo on this rank: ")[0]


# ---- two hosts ---------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Hosts:
    """Two network namespaces ``<tag>a`` (10.77.0.1) and ``<tag>b`` (10.77.0.2) on one veth pair.

    ``<tag>b`` also holds a second veth pair, ``<tag>p`` (10.76.0.2) to ``<tag>q``, which leads
    nowhere: ``<tag>a`` has no route to it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.ns = [f"{tag}a", f"{tag}b"]
        self.veth = [f"{tag}x", f"{tag}y"]
        self.addr = [MASTER, "10.77.0.2"]
        self.stray = f"{tag}p"
        self._made_netns_dir = False

    def up(self) -> None:
        hosts = f"127.0.0.1 localhost\n127.0.1.1 {os.uname().nodename}\n"  # Debian's
        etc = Path("/etc/netns")
        self._made_netns_dir = not etc.exists()
        for ns in self.ns:
            (etc / ns).mkdir(parents=True, exist_ok=True)
            (etc / ns / "hosts").write_text(hosts)
            _ip("netns", "add", ns)
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, addr in zip(self.ns, self.veth, self.addr, strict=True):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        b = self.ns[1]
        _ip("-n", b, "link", "add", self.stray, "type", "veth", "peer", "name", f"{self.tag}q")
        _ip("-n", b, "addr", "add", "10.76.0.2/24", "dev", self.stray)
        for dev in (self.stray, f"{self.tag}q"):
            _ip("-n", b, "link", "set", dev, "up")

    def kill(self, node: int) -> None:
        """SIGKILL every process of host ``node`` (the whole host dies)."""
        for _ in range(20):
            pids = [int(p) for p in _ip("netns", "pids", self.ns[node], check=False).stdout.split()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def down(self) -> None:
        for node, ns in enumerate(self.ns):
            self.kill(node)
            _ip("netns", "del", ns, check=False)  # its veths go with it
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        _ip("link", "del", self.veth[0], check=False)  # only if it never moved
        if self._made_netns_dir:
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()  # only if empty

    def launch(self, node: int, port: int, out: Path, *args: str, **extra: str) -> subprocess.Popen:
        """The README's recipe on host ``node``: torchrun per node, one rank, MASTER_ADDR host 0."""
        log = open(out.parent / f"{out.name}.node{node}.log", "w")  # noqa: SIM115 - closed by the process
        cmd = [*torchrun(2, node, 1, MASTER, port), *TRAIN, *args, "--output", str(out)]
        e = env(**extra)
        wrap = ["ip", "netns", "exec", self.ns[node], "env", f"PYTHONPATH={e['PYTHONPATH']}"]
        return subprocess.Popen([*wrap, *cmd], cwd=ROOT, env=e, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _cannot_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add); CI runs as root"
    if shutil.which("ip") is None:
        return "needs iproute2's ip (apt-get install iproute2)"
    probe = f"pfcprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    _ip("netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def hosts():
    reason = _cannot_make_namespaces()
    if reason:
        pytest.skip(reason)
    h = Hosts(f"pfc{os.getpid()}")
    try:
        try:
            h.up()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build the two hosts: {' '.join(exc.cmd)}: {exc.stderr.strip()}")
        yield h
    finally:
        h.down()


def _log(out: Path, node: int) -> str:
    return (out.parent / f"{out.name}.node{node}.log").read_text()


def _wait(procs: list[subprocess.Popen], limit: float) -> list[float]:
    """Seconds until each process ended (fails past ``limit``)."""
    t0, ends = time.monotonic(), [0.0] * len(procs)
    while not all(ends):
        for i, p in enumerate(procs):
            if not ends[i] and p.poll() is not None:
                ends[i] = time.monotonic() - t0
        assert time.monotonic() - t0 < limit, f"still running after {limit} s"
        time.sleep(0.1)
    return ends


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _worker_exit(log: str) -> int | None:
    """The worker's exit code in torchrun's failure summary (torchrun itself exits 1)."""
    found = re.search(r"exitcode\s*:\s*(-?\d+)", log)
    return int(found.group(1)) if found else None


def _errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("train.py: error: ")]


@pytest.mark.slow
def test_two_hosts_train_as_one_node_with_two_ranks(hosts, tmp_path):
    two, port = tmp_path / "two", free_port()
    procs = [hosts.launch(node, port, two, *STEPS) for node in (0, 1)]
    try:
        _wait(procs, 240)
    finally:
        _stop(procs)
    for node, p in enumerate(procs):
        assert p.returncode == 0, f"node {node}:\n{_log(two, node)[-3000:]}"
    assert f"gloo uses {hosts.veth[0]} ({MASTER}, the route to MASTER_ADDR={MASTER})" in _log(
        two, 0
    )

    one = tmp_path / "one"
    cmd = [*torchrun(1, 0, 2, "127.0.0.1", free_port()), *TRAIN, *STEPS, "--output", str(one)]
    ref = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    assert_same_run(one, two, [10, 20])
    assert losses(one)[20] == losses(two)[20]


@pytest.mark.slow
def test_a_killed_host_makes_the_other_exit_75_naming_its_rank(hosts, tmp_path):
    out, port = tmp_path / "kill", free_port()
    args = ["--max-steps", "200", "--log-every", "1"]
    procs = [hosts.launch(node, port, out, *args) for node in (0, 1)]
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"^step 5/", _log(out, 0), re.M):
            assert procs[0].poll() is None, _log(out, 0)[-3000:]
            assert time.monotonic() < deadline, "no step 5 on node 0"
            time.sleep(0.1)
        hosts.kill(1)
        t0 = time.monotonic()
        procs[0].wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        _stop(procs)
    log = _log(out, 0)
    assert procs[0].returncode != 0 and _worker_exit(log) == EXIT_CODE, log[-3000:]
    (line,) = _errors(log)
    # The kill lands inside a step or in the stop agreement between two; both name the step.
    where = r"(in step \d+|agreeing on a stop after step \d+)"
    assert re.match(rf"train\.py: error: rank 0: a collective failed {where}: rank\(s\) \[1\] "
                    r"did not respond \(dead or hung\)", line), line  # fmt: skip
    assert took < 60, took
    print(f"node 0 exited {took:.1f} s after host 1 was killed")


@pytest.mark.slow
def test_a_loopback_pick_is_refused_on_every_node(hosts, tmp_path):
    """What gloo's hostname rule gives under Debian's /etc/hosts, forced through the pick."""
    out, port = tmp_path / "loopback", free_port()
    procs = [hosts.launch(n, port, out, *STEPS, PFC_DS_FAULT="gloo_loopback") for n in (0, 1)]
    ends = _wait(procs, 120)
    lines = []
    for node in (0, 1):
        log = _log(out, node)
        assert procs[node].returncode != 0 and _worker_exit(log) == 2, log[-3000:]
        (line,) = _errors(log)
        lines.append(line)
    assert _common(lines[0]) == _common(lines[1])
    for part in ("would listen on a loopback address", "rank 0 (node 0) 127.0.0.1 on lo",
                 "rank 1 (node 1) 127.0.0.1 on lo", f"MASTER_ADDR={MASTER}",
                 "GLOO_SOCKET_IFNAME"):  # fmt: skip
        assert part in lines[0], part
    assert max(ends) < 60, ends
    print(f"refused on both nodes {max(ends):.1f} s after launch (start-up included)")


@pytest.mark.slow
def test_an_unreachable_node_fails_every_node_within_60_s(hosts, tmp_path):
    """Host 1 listens on a veth that host 0 has no route to: host 0's connect fails at once,
    host 1 waits for a connection that never comes, until train.connect_timeout_s (8 s here,
    so the suite does not sit out the default 30 s)."""
    out, port = tmp_path / "unreachable", free_port()
    short = [*STEPS, "--set", "train.connect_timeout_s=8"]
    procs = [
        hosts.launch(0, port, out, *short),
        hosts.launch(1, port, out, *short, GLOO_SOCKET_IFNAME=hosts.stray),
    ]
    ends = _wait(procs, 150)
    lines = []
    for node in (0, 1):
        log = _log(out, node)
        assert procs[node].returncode != 0 and _worker_exit(log) == EXIT_CODE, log[-3000:]
        (line,) = _errors(log)
        lines.append(line)
    assert _common(lines[0]) == _common(lines[1])
    assert "did not connect within train.connect_timeout_s=8" in lines[0]
    assert f"rank 1 (node 1) 10.76.0.2 on {hosts.stray} (GLOO_SOCKET_IFNAME=" in lines[0]
    assert max(ends) < 40, ends
    print(f"node 0 exited after {ends[0]:.1f} s, node 1 after {ends[1]:.1f} s (start-up included)")


def _side_group(rank: int, world: int) -> list:
    """The GPU path's gloo side group, made next to a gloo default group: agreed, connected
    under a 3 s connect timeout, then a collective that outwaits it (rank 1 is 4 s late)."""
    import torch

    from pfc_ds.train.distributed import gloo_side_group

    network.choose_interface()
    group = gloo_side_group(60.0, 3.0)
    if rank == 1:
        time.sleep(4)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=group)
    return [t.item(), os.environ.get("GLOO_SOCKET_IFNAME")]


def test_the_gloo_side_group_connects_then_gets_the_collective_timeout():
    from tests.dist import run_distributed

    assert run_distributed(_side_group, 2) == [[3.0, "lo"], [3.0, "lo"]]
